//! Codec tests: round trips, malformed input, and property-based fuzzing of
//! both decoders (random bytes and mutated valid frames never panic).

use super::*;
use crate::wire::{MAX_BATCH_PAGES_HARD, PROTOCOL_VERSION};
use proptest::prelude::*;

fn page(seed: u8) -> Page {
    let mut p = [0u8; PAGE_SIZE];
    for (i, b) in p.iter_mut().enumerate() {
        *b = seed.wrapping_add(i as u8).wrapping_mul(31);
    }
    p
}

fn one_frame(buf: &[u8]) -> (FrameHeader, &[u8]) {
    let (h, payload, rest) = split_frame(buf, u32::MAX).unwrap().unwrap();
    assert!(rest.is_empty());
    (h, payload)
}

#[test]
fn hello_round_trip() {
    let mut buf = Vec::new();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        node_id: 42,
        tenant: "team-a",
        credential: b"s3cret",
    };
    encode_hello(&mut buf, &hello);
    let (h, p) = one_frame(&buf);
    match Request::decode(&h, p, 16).unwrap() {
        Request::Hello(got) => assert_eq!(got, hello),
        other => panic!("decoded {other:?}"),
    }
}

#[test]
fn put_round_trip_and_checksums() {
    let pages = [page(1), page(2), page(3)];
    let mut buf = Vec::new();
    encode_put(
        &mut buf,
        7,
        pages.iter().enumerate().map(|(i, p)| (i as u64 * 10, p)),
    );
    let (h, p) = one_frame(&buf);
    assert_eq!(h.request_id, 7);
    let Request::Put(batch) = Request::decode(&h, p, 16).unwrap() else {
        panic!("not a put")
    };
    assert_eq!(batch.len(), 3);
    for (i, e) in batch.iter().enumerate() {
        assert_eq!(e.handle, i as u64 * 10);
        assert!(e.checksum_ok());
        assert_eq!(e.data, &pages[i]);
    }
}

#[test]
fn put_with_flipped_bit_fails_checksum() {
    let data = page(9);
    let mut buf = Vec::new();
    encode_put(&mut buf, 1, [(5u64, &data)].into_iter());
    let last = buf.len() - 1;
    buf[last] ^= 1;
    let (h, p) = one_frame(&buf);
    let Request::Put(batch) = Request::decode(&h, p, 16).unwrap() else {
        panic!("not a put")
    };
    assert!(!batch.iter().next().unwrap().checksum_ok());
}

#[test]
fn get_ok_round_trip_mixed_statuses() {
    let data = page(4);
    let mut buf = Vec::new();
    let mut w = GetOkWriter::begin(&mut buf, 3, 3);
    w.push_page(page_crc(&data), |dst| dst.copy_from_slice(&data));
    w.push_status(PageStatus::NotFound);
    w.push_page(page_crc(&data), |dst| dst.copy_from_slice(&data));
    w.finish();
    let (h, p) = one_frame(&buf);
    let Response::GetOk(batch) = Response::decode(&h, p, 16).unwrap() else {
        panic!("not get_ok")
    };
    let got: Vec<_> = batch.iter().collect();
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].status, PageStatus::Ok);
    assert_eq!(got[0].data.unwrap(), &data);
    assert_eq!(got[1].status, PageStatus::NotFound);
    assert!(got[1].data.is_none());
    assert_eq!(got[2].crc, page_crc(&data));
}

#[test]
fn statuses_stat_and_error_round_trip() {
    let mut buf = Vec::new();
    encode_statuses(
        &mut buf,
        Opcode::PutOk,
        9,
        &[PageStatus::Ok, PageStatus::QuotaExceeded],
    );
    let (h, p) = one_frame(&buf);
    let Response::PutOk(s) = Response::decode(&h, p, 16).unwrap() else {
        panic!()
    };
    assert_eq!(
        s.iter().collect::<Vec<_>>(),
        [PageStatus::Ok, PageStatus::QuotaExceeded]
    );

    buf.clear();
    let stat = Stat {
        capacity_pages: 1,
        used_pages: 2,
        tenant_used_pages: 3,
        tenant_quota_pages: u64::MAX,
    };
    encode_stat_ok(&mut buf, 4, &stat);
    let (h, p) = one_frame(&buf);
    assert!(matches!(Response::decode(&h, p, 16).unwrap(), Response::StatOk(s) if s == stat));

    buf.clear();
    encode_error(&mut buf, 0, ErrorCode::AuthFailed, "wrong credential");
    let (h, p) = one_frame(&buf);
    let Response::Error(e) = Response::decode(&h, p, 16).unwrap() else {
        panic!()
    };
    assert_eq!(e.code, ErrorCode::AuthFailed);
    assert_eq!(e.message, "wrong credential");
}

#[test]
fn hello_ok_round_trip() {
    let mut buf = Vec::new();
    let ok = HelloOk {
        flags: 0,
        version: 1,
        page_size: 4096,
        limits: Limits::for_batch(64),
        server_id: 0xdead_beef,
    };
    encode_hello_ok(&mut buf, &ok);
    let (h, p) = one_frame(&buf);
    assert!(matches!(Response::decode(&h, p, 16).unwrap(), Response::HelloOk(got) if got == ok));
}

#[test]
fn header_rejects_oversized_and_unknown() {
    let h = FrameHeader {
        len: 1_000_000,
        opcode: Opcode::Put,
        request_id: 1,
    }
    .encode();
    assert_eq!(
        FrameHeader::decode(&h, 1000),
        Err(DecodeError::FrameTooLarge {
            len: 1_000_000,
            max: 1000
        })
    );
    let mut bad = h;
    bad[4] = 0x42;
    assert_eq!(
        FrameHeader::decode(&bad, u32::MAX),
        Err(DecodeError::UnknownOpcode(0x42))
    );
    let mut bad = h;
    bad[6] = 1;
    assert_eq!(
        FrameHeader::decode(&bad, u32::MAX),
        Err(DecodeError::ReservedBits)
    );
}

#[test]
fn batch_count_is_checked_against_limit_and_payload() {
    let mut buf = Vec::new();
    encode_handles(&mut buf, Opcode::Get, 1, &[1, 2, 3]);
    let (h, p) = one_frame(&buf);
    assert!(matches!(
        Request::decode(&h, p, 2),
        Err(DecodeError::BatchTooLarge { count: 3, max: 2 })
    ));
    // A count that claims more than the payload holds.
    let mut lying = buf.clone();
    lying[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&1000u32.to_le_bytes());
    let (h, p) = one_frame(&lying);
    assert!(matches!(
        Request::decode(&h, p, MAX_BATCH_PAGES_HARD),
        Err(DecodeError::Length { .. })
    ));
}

#[test]
fn split_frame_waits_for_whole_frames() {
    let mut buf = Vec::new();
    encode_stat(&mut buf, 1);
    encode_handles(&mut buf, Opcode::Free, 2, &[8]);
    for cut in 0..buf.len() {
        let r = split_frame(&buf[..cut], u32::MAX).unwrap();
        if cut < HEADER_LEN {
            assert!(r.is_none());
        }
    }
    let (h1, _, rest) = split_frame(&buf, u32::MAX).unwrap().unwrap();
    let (h2, _, rest) = split_frame(rest, u32::MAX).unwrap().unwrap();
    assert_eq!((h1.request_id, h2.request_id), (1, 2));
    assert!(rest.is_empty());
}

#[test]
fn responses_are_not_requests() {
    let mut buf = Vec::new();
    encode_stat_ok(&mut buf, 1, &Stat::default());
    let (h, p) = one_frame(&buf);
    assert_eq!(
        Request::decode(&h, p, 16).unwrap_err(),
        DecodeError::Unexpected(Opcode::StatOk)
    );
}

/// Valid frames of every kind, to mutate.
fn corpus() -> Vec<Vec<u8>> {
    let data = page(0);
    let mut frames = Vec::new();
    let mut b = Vec::new();
    encode_hello(
        &mut b,
        &Hello {
            version: 1,
            node_id: 1,
            tenant: "t",
            credential: b"c",
        },
    );
    frames.push(std::mem::take(&mut b));
    encode_put(&mut b, 1, [(1u64, &data), (2, &data)].into_iter());
    frames.push(std::mem::take(&mut b));
    encode_handles(&mut b, Opcode::Get, 1, &[1, 2]);
    frames.push(std::mem::take(&mut b));
    let mut w = GetOkWriter::begin(&mut b, 1, 2);
    w.push_page(0, |d| d.copy_from_slice(&data));
    w.push_status(PageStatus::NotFound);
    w.finish();
    frames.push(std::mem::take(&mut b));
    encode_statuses(&mut b, Opcode::FreeOk, 1, &[PageStatus::Ok]);
    frames.push(std::mem::take(&mut b));
    encode_error(&mut b, 1, ErrorCode::BadFrame, "x");
    frames.push(std::mem::take(&mut b));
    encode_hello_ok(
        &mut b,
        &HelloOk {
            flags: 0,
            version: 1,
            page_size: 4096,
            limits: Limits::default(),
            server_id: 1,
        },
    );
    frames.push(b);
    frames
}

/// Decodes everything in `bytes` both ways; must never panic.
fn decode_all(bytes: &[u8]) {
    let mut rest = bytes;
    while let Ok(Some((h, payload, next))) = split_frame(rest, 1 << 20) {
        let _ = Request::decode(&h, payload, 4).map(|r| {
            if let Request::Put(b) = r {
                b.iter().for_each(|e| {
                    let _ = e.checksum_ok();
                });
            }
        });
        if let Ok(Response::GetOk(b)) = Response::decode(&h, payload, 4) {
            assert!(b.iter().count() == b.len());
        }
        rest = next;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }

    #[test]
    fn mutated_frames_never_panic(
        which in 0usize..7,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut f = corpus()[which].clone();
        for (at, v) in flips {
            let i = at % f.len();
            f[i] = v;
        }
        let keep = f.len() - cut % (f.len() / 2 + 1);
        decode_all(&f[..keep]);
    }

    #[test]
    fn handles_round_trip(handles in proptest::collection::vec(any::<u64>(), 0..64), id in any::<u64>()) {
        let mut buf = Vec::new();
        encode_handles(&mut buf, Opcode::Free, id, &handles);
        let (h, p) = one_frame(&buf);
        prop_assert_eq!(h.request_id, id);
        let Ok(Request::Free(got)) = Request::decode(&h, p, 64) else {
            return Err(TestCaseError::fail("did not decode"));
        };
        prop_assert_eq!(got.iter().collect::<Vec<_>>(), handles);
    }
}
