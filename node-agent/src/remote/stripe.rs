//! Erasure-coded stripes (`ec=K+M`): where each page of a stripe is, and
//! the Reed-Solomon codec (`reed-solomon-simd`).
//!
//! A piece of an eviction batch stored with `ec=K+M` holds `count` data
//! pages from handle `first`, cut into `n = ceil(count / K)` stripes, over
//! K+M *slots* (distinct servers):
//!
//! - data slot `i` (of K) holds the data handles `first + i*n ..
//!   first + (i+1)*n`: consecutive pages of a batch sit on one server, so a
//!   prefetch of a sequential reader is one request, as without coding;
//! - parity slot `K+m` holds the parity handles `parity + m*n ..
//!   parity + (m+1)*n` (taken from the same handle space);
//! - stripe `j` is the page at offset `j` of every slot. The last data slots
//!   may have no page for the last stripes (`count` not a multiple of K):
//!   such a page reads as zeroes, and counts as one of the K a decode needs.
//!
//! Pages of a stripe come back and die one by one, but the parity stays
//! valid only with every data page of its stripe: a dead data page stays on
//! its server until the whole stripe is dead (see [`Striped::live`]).

use std::sync::OnceLock;

use reed_solomon_simd::ReedSolomonEncoder;
use reed_solomon_simd::engine::{DefaultEngine, Engine, GF_MODULUS, GfElement, tables};
use rmem_client::{PAGE_SIZE, Page};
use rmem_common::redundancy::{MAX_DATA, MAX_PARITY};

/// Where the pages of one erasure-coded piece are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The first data handle.
    pub first: u64,
    /// Data pages.
    pub count: u64,
    /// Data pages per stripe (K).
    pub data: u8,
    /// Parity pages per stripe (M).
    pub parity: u8,
    /// The first parity handle.
    pub parity_first: u64,
}

impl Layout {
    /// Stripes, and so pages per slot.
    pub fn stripes(&self) -> u64 {
        self.count.div_ceil(u64::from(self.data))
    }

    /// Slots (servers): data and parity.
    pub fn width(&self) -> usize {
        usize::from(self.data + self.parity)
    }

    /// Parity handles taken.
    pub fn parity_pages(&self) -> u64 {
        self.stripes() * u64::from(self.parity)
    }

    /// The stripe and data slot of data handle `h`.
    pub fn locate(&self, h: u64) -> (u64, usize) {
        let off = h - self.first;
        let n = self.stripes();
        (off % n, (off / n) as usize)
    }

    /// The handle slot `slot` holds for stripe `j`; `None` when the slot
    /// has no page there (a short last stripe: zeroes).
    pub fn handle(&self, j: u64, slot: usize) -> Option<u64> {
        let n = self.stripes();
        let k = usize::from(self.data);
        if slot < k {
            let off = slot as u64 * n + j;
            (off < self.count).then_some(self.first + off)
        } else {
            Some(self.parity_first + (slot - k) as u64 * n + j)
        }
    }

    /// Every page of stripe `j`: (slot, handle).
    pub fn stripe(&self, j: u64) -> impl Iterator<Item = (usize, u64)> + '_ {
        (0..self.width()).filter_map(move |s| self.handle(j, s).map(|h| (s, h)))
    }

    /// Whether `h` is one of this piece's parity handles.
    pub fn is_parity(&self, h: u64) -> bool {
        h.wrapping_sub(self.parity_first) < self.parity_pages()
    }
}

/// An erasure-coded run on the book: its layout and how many data pages of
/// each stripe are still live.
#[derive(Debug, Clone)]
pub struct Striped {
    pub layout: Layout,
    /// Live data pages per stripe; a stripe whose count reaches 0 is freed
    /// whole (data and parity).
    pub live: Vec<u8>,
}

impl Striped {
    pub fn new(layout: Layout) -> Self {
        let live = (0..layout.stripes())
            .map(|j| {
                (0..usize::from(layout.data))
                    .filter(|&s| layout.handle(j, s).is_some())
                    .count() as u8
            })
            .collect();
        Self { layout, live }
    }

    /// Stripes with a live data page.
    pub fn alive(&self) -> impl Iterator<Item = u64> + '_ {
        self.live
            .iter()
            .enumerate()
            .filter(|(_, l)| **l > 0)
            .map(|(j, _)| j as u64)
    }

    /// Handles slot `slot` holds for live stripes.
    pub fn slot_handles(&self, slot: usize) -> Vec<u64> {
        self.alive()
            .filter_map(|j| self.layout.handle(j, slot))
            .collect()
    }
}

/// Why a stripe could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("erasure coding: {0}")]
pub struct CodecError(String);

impl From<reed_solomon_simd::Error> for CodecError {
    fn from(e: reed_solomon_simd::Error) -> Self {
        CodecError(e.to_string())
    }
}

const ZERO: Page = [0u8; PAGE_SIZE];

/// The parity pages of a piece: parity page `m` of stripe `j` at
/// `m * stripes + j` (the order of its handles). `page(off)` is the data
/// page at offset `off` of the piece.
pub fn encode<'p>(
    layout: &Layout,
    page: impl Fn(usize) -> &'p Page,
) -> Result<Vec<Page>, CodecError> {
    let (k, m) = (usize::from(layout.data), usize::from(layout.parity));
    let n = layout.stripes();
    let mut out = vec![ZERO; m * n as usize];
    let mut enc = ReedSolomonEncoder::new(k, m, PAGE_SIZE)?;
    for j in 0..n {
        for s in 0..k {
            match layout.handle(j, s) {
                Some(h) => enc.add_original_shard(page((h - layout.first) as usize))?,
                None => enc.add_original_shard(ZERO)?,
            }
        }
        let r = enc.encode()?;
        for (p, shard) in r.recovery_iter().enumerate() {
            out[p * n as usize + j as usize].copy_from_slice(shard);
        }
    }
    Ok(out)
}

/// Page `want` (a data or a parity slot) of stripe `j` from any K of its
/// pages: `have` is (slot, page) of pages read; slots with no page
/// (zeroes) are taken from the layout.
///
/// The code is linear over the field `reed-solomon-simd` computes in
/// (GF(2^16), each 4 KiB page 2048 symbols): parity page `m` is
/// `sum_i G[m][i] * data_i`. Rather than the crate's decoder, whose fixed
/// cost (a transform over the whole field, about 250 us) would dwarf a
/// degraded fault, the K pages at hand are solved for the one wanted: the
/// K x K system of their rows of `[I; G]` is inverted (K <= 8, scalar
/// work) and the page is a combination of K pages, SIMD multiplies of the
/// crate's engine (a parity page's coefficients are its generator row
/// times the inverse).
pub fn reconstruct(
    layout: &Layout,
    j: u64,
    want: usize,
    have: &[(usize, &Page)],
) -> Result<Page, CodecError> {
    let (k, m) = (usize::from(layout.data), usize::from(layout.parity));
    if want >= k + m {
        return Err(CodecError(format!("no slot {want} in ec={k}+{m}")));
    }
    if layout.handle(j, want).is_none() {
        return Ok(ZERO);
    }
    if let Some((_, p)) = have.iter().find(|(s, _)| *s == want) {
        return Ok(**p);
    }
    // K rows: the zero pages of a short stripe first, then what was read.
    let mut rows: Vec<(usize, Option<&Page>)> = (0..k)
        .filter(|&s| layout.handle(j, s).is_none())
        .map(|s| (s, None))
        .collect();
    for &(s, p) in have {
        if rows.len() == k {
            break;
        }
        if s >= k + m || rows.iter().any(|(r, _)| *r == s) {
            continue;
        }
        rows.push((s, Some(p)));
    }
    if rows.len() < k {
        return Err(CodecError(format!(
            "{} pages of the stripe, {k} needed",
            rows.len()
        )));
    }
    let g = generator(k, m)?;
    let f = Field::get();
    let matrix: Vec<Vec<GfElement>> = rows
        .iter()
        .map(|&(s, _)| {
            if s < k {
                f.unit(k, s)
            } else {
                g[s - k].clone()
            }
        })
        .collect();
    let inverse = f
        .invert(matrix)
        .ok_or_else(|| CodecError("the stripe's pages do not determine the page".into()))?;
    // data_i = sum over rows r of inverse[i][r] * page_r; a parity page
    // is its generator row over the data, so over the rows too.
    let coef: Vec<GfElement> = if want < k {
        inverse[want].clone()
    } else {
        (0..k)
            .map(|r| (0..k).fold(0, |acc, i| acc ^ f.mul(g[want - k][i], inverse[i][r])))
            .collect()
    };
    let engine = engine();
    let mut out = ZERO;
    let mut term = ZERO;
    for (r, (_, page)) in rows.iter().enumerate() {
        let c = coef[r];
        let Some(page) = page else { continue };
        if c == 0 {
            continue;
        }
        term.copy_from_slice(&page[..]);
        engine.mul(chunks(&mut term), f.log(c));
        for (o, t) in out.iter_mut().zip(&term) {
            *o ^= t;
        }
    }
    Ok(out)
}

/// A page as the engine's 64-byte chunks.
fn chunks(page: &mut Page) -> &mut [[u8; 64]] {
    let (chunks, rest) = page.as_chunks_mut::<64>();
    debug_assert!(rest.is_empty());
    chunks
}

fn engine() -> &'static DefaultEngine {
    static ENGINE: OnceLock<DefaultEngine> = OnceLock::new();
    ENGINE.get_or_init(DefaultEngine::new)
}

/// Scalar arithmetic in the crate's field (its exp/log tables).
struct Field {
    exp: &'static [GfElement],
    log: &'static [GfElement],
}

impl Field {
    fn get() -> Self {
        let t = tables::get_exp_log();
        Self {
            exp: &t.exp[..],
            log: &t.log[..],
        }
    }

    /// The multiplicative identity (the element whose log is 0).
    fn one(&self) -> GfElement {
        self.exp[0]
    }

    /// Row `i` of the n x n identity.
    fn unit(&self, n: usize, i: usize) -> Vec<GfElement> {
        (0..n)
            .map(|c| if c == i { self.one() } else { 0 })
            .collect()
    }

    fn log(&self, x: GfElement) -> GfElement {
        self.log[usize::from(x)]
    }

    fn mul(&self, a: GfElement, b: GfElement) -> GfElement {
        if a == 0 || b == 0 {
            return 0;
        }
        let sum = u32::from(self.log(a)) + u32::from(self.log(b));
        self.exp[(sum % u32::from(GF_MODULUS)) as usize]
    }

    fn inv(&self, a: GfElement) -> GfElement {
        let l = u32::from(self.log(a));
        self.exp[((u32::from(GF_MODULUS) - l) % u32::from(GF_MODULUS)) as usize]
    }

    /// Gauss-Jordan; `None` if singular.
    fn invert(&self, mut a: Vec<Vec<GfElement>>) -> Option<Vec<Vec<GfElement>>> {
        let n = a.len();
        let mut inv: Vec<Vec<GfElement>> = (0..n).map(|r| self.unit(n, r)).collect();
        for col in 0..n {
            let pivot = (col..n).find(|&r| a[r][col] != 0)?;
            a.swap(col, pivot);
            inv.swap(col, pivot);
            let p = self.inv(a[col][col]);
            for c in 0..n {
                a[col][c] = self.mul(a[col][c], p);
                inv[col][c] = self.mul(inv[col][c], p);
            }
            for r in (0..n).filter(|&r| r != col) {
                let f = a[r][col];
                if f == 0 {
                    continue;
                }
                for c in 0..n {
                    a[r][c] ^= self.mul(f, a[col][c]);
                    inv[r][c] ^= self.mul(f, inv[col][c]);
                }
            }
        }
        Some(inv)
    }
}

/// The coefficients of ec=K+M's parity pages over its data pages (M rows
/// of K), found once by encoding each data page alone as the identity.
fn generator(k: usize, m: usize) -> Result<&'static Vec<Vec<GfElement>>, CodecError> {
    type Generators = [OnceLock<Vec<Vec<GfElement>>>; MAX_CODES];
    const MAX_CODES: usize = (MAX_DATA + 1) * (MAX_PARITY + 1);
    static GENERATORS: Generators = [const { OnceLock::new() }; MAX_CODES];
    if k > MAX_DATA || m > MAX_PARITY {
        return Err(CodecError(format!("ec={k}+{m} is not supported")));
    }
    let cell = &GENERATORS[k * (MAX_PARITY + 1) + m];
    if let Some(g) = cell.get() {
        return Ok(g);
    }
    let one = Field::get().one();
    let mut g = vec![vec![0; k]; m];
    let mut enc = ReedSolomonEncoder::new(k, m, 64)?;
    #[allow(clippy::needless_range_loop)] // i is a column of g
    for i in 0..k {
        for s in 0..k {
            let mut shard = [0u8; 64];
            if s == i {
                // Symbol 0 of a chunk: its low byte, then its high byte 32
                // bytes on.
                shard[0] = one as u8;
                shard[32] = (one >> 8) as u8;
            }
            enc.add_original_shard(shard)?;
        }
        let r = enc.encode()?;
        for (row, shard) in r.recovery_iter().enumerate() {
            g[row][i] = GfElement::from(shard[0]) | (GfElement::from(shard[32]) << 8);
        }
    }
    Ok(cell.get_or_init(|| g))
}

/// Pages of stripe `j` a decode still needs beyond `have` (zeroes count).
pub fn needed(layout: &Layout, j: u64, have: usize) -> usize {
    let zeroes = (0..usize::from(layout.data))
        .filter(|&s| layout.handle(j, s).is_none())
        .count();
    usize::from(layout.data).saturating_sub(zeroes + have)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(count: u64, data: u8, parity: u8) -> Layout {
        Layout {
            first: 1000,
            count,
            data,
            parity,
            parity_first: 5000,
        }
    }

    fn page(seed: usize) -> Page {
        let mut p = ZERO;
        for (i, b) in p.iter_mut().enumerate() {
            *b = (seed * 31 + i * 7 + (i >> 8)) as u8;
        }
        p
    }

    #[test]
    fn consecutive_pages_share_a_slot_and_stripes_cross_slots() {
        let l = layout(10, 4, 2);
        assert_eq!(l.stripes(), 3);
        assert_eq!(l.locate(1000), (0, 0));
        assert_eq!(l.locate(1002), (2, 0));
        assert_eq!(l.locate(1003), (0, 1));
        assert_eq!(l.locate(1009), (0, 3));
        // The last slot has one page: stripes 1 and 2 read zeroes there.
        assert_eq!(l.handle(0, 3), Some(1009));
        assert_eq!(l.handle(1, 3), None);
        assert_eq!(l.handle(2, 5), Some(5000 + 3 + 2));
        assert!(l.is_parity(5005) && !l.is_parity(5006) && !l.is_parity(1000));
        let s = Striped::new(l);
        assert_eq!(s.live, [4, 3, 3]);
        assert_eq!(s.slot_handles(3), [1009]);
        assert_eq!(needed(&l, 1, 0), 3);
    }

    #[test]
    fn any_k_pages_rebuild_every_data_page() {
        for (count, k, m) in [(10u64, 4u8, 2u8), (1, 4, 2), (8, 2, 1), (23, 8, 3)] {
            let l = layout(count, k, m);
            let data: Vec<Page> = (0..count as usize).map(page).collect();
            let parity = encode(&l, |off| &data[off]).unwrap();
            let n = l.stripes();
            let get = |h: u64| -> Page {
                if l.is_parity(h) {
                    parity[(h - l.parity_first) as usize]
                } else {
                    data[(h - l.first) as usize]
                }
            };
            for h in l.first..l.first + count {
                let (j, want) = l.locate(h);
                assert!(j < n);
                // Lose the page's own slot and the next M-1 slots.
                let lost: Vec<usize> = (0..usize::from(m))
                    .map(|d| (want + d) % l.width())
                    .collect();
                let pages: Vec<(usize, Page)> = l
                    .stripe(j)
                    .filter(|(s, _)| !lost.contains(s))
                    .map(|(s, h)| (s, get(h)))
                    .collect();
                let have: Vec<(usize, &Page)> = pages.iter().map(|(s, p)| (*s, p)).collect();
                let got = reconstruct(&l, j, want, &have).unwrap();
                assert!(
                    got == data[(h - l.first) as usize],
                    "ec={k}+{m} count {count} handle {h}"
                );
            }
        }
    }

    #[test]
    fn lost_parity_pages_are_encoded_again() {
        for (count, k, m) in [(7u64, 2u8, 2u8), (10, 4, 2), (23, 8, 3), (5, 3, 4)] {
            let l = layout(count, k, m);
            let data: Vec<Page> = (0..count as usize).map(page).collect();
            let parity = encode(&l, |off| &data[off]).unwrap();
            let get = |h: u64| -> Page {
                if l.is_parity(h) {
                    parity[(h - l.parity_first) as usize]
                } else {
                    data[(h - l.first) as usize]
                }
            };
            for j in 0..l.stripes() {
                for want in usize::from(k)..l.width() {
                    // Any K others: start past the lost slot.
                    let pages: Vec<(usize, Page)> = (1..l.width())
                        .map(|d| (want + d) % l.width())
                        .filter_map(|s| l.handle(j, s).map(|h| (s, get(h))))
                        .collect();
                    let have: Vec<(usize, &Page)> = pages.iter().map(|(s, p)| (*s, p)).collect();
                    let got = reconstruct(&l, j, want, &have).unwrap();
                    let h = l.handle(j, want).unwrap();
                    assert!(
                        got == get(h),
                        "ec={k}+{m} count {count} stripe {j} slot {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn too_few_pages_do_not_decode() {
        let l = layout(8, 4, 2);
        let data: Vec<Page> = (0..8).map(page).collect();
        let parity = encode(&l, |off| &data[off]).unwrap();
        let have = [(1usize, &data[2]), (4, &parity[0])];
        assert!(reconstruct(&l, 0, 0, &have).is_err());
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// Not a test of speed (`cargo test --release -- --ignored --nocapture`
    /// prints it): what a degraded fault's decode costs.
    #[test]
    #[ignore = "prints timings"]
    fn decode_cost() {
        let l = Layout {
            first: 0,
            count: 64,
            data: 4,
            parity: 2,
            parity_first: 1000,
        };
        let data: Vec<Page> = (0..64).map(|i| [i as u8; PAGE_SIZE]).collect();
        let parity = encode(&l, |o| &data[o]).unwrap();
        let have = [
            (1usize, &data[16]),
            (2, &data[32]),
            (3, &data[48]),
            (4, &parity[0]),
        ];
        let t = std::time::Instant::now();
        for _ in 0..1000 {
            assert!(reconstruct(&l, 0, 0, &have).unwrap() == data[0]);
        }
        eprintln!("ec=4+2 decode of one page: {:?}", t.elapsed() / 1000);
        let t = std::time::Instant::now();
        for _ in 0..100 {
            let _ = encode(&l, |o| &data[o]).unwrap();
        }
        eprintln!("ec=4+2 encode of 64 pages: {:?}", t.elapsed() / 100);
    }
}
