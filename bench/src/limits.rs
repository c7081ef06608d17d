//! What the machine allows, measured in the same run as rmem: a raw 4 KiB
//! TCP ping-pong (the floor of a remote fault over TCP), a raw TCP stream
//! (the ceiling of eviction), and memcpy (the ceiling of everything).
//!
//! The raw peers do exactly what the data plane must do at the least:
//! blocking sockets with TCP_NODELAY, a 16-byte request, a 4 KiB reply,
//! the reading thread doing the work itself.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rmem_common::Histogram;
use serde::Serialize;

use crate::Latency;

/// The machine's limits.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    /// Round trip of a 16-byte request answered by 4 KiB, µs, measured
    /// interleaved with rmem's single-page GETs (so both run with the same
    /// thread placement; see [`PingPong`]).
    pub tcp_rtt_4k_us: Latency,
    /// One-way loopback stream with 1 MiB writes, MiB/s.
    pub tcp_stream_mib_s: f64,
    /// Single-thread memcpy of a 64 MiB buffer, MiB/s.
    pub memcpy_mib_s: f64,
}

/// How long each limit is measured.
#[derive(Debug, Clone, Copy)]
pub struct Effort {
    pub stream_for: Duration,
    pub memcpy_rounds: usize,
}

/// Measures the stream and memcpy limits; the round trip comes from
/// `rtt`, recorded by the caller next to what it compares it with.
pub fn measure(effort: Effort, rtt: &Histogram) -> std::io::Result<Limits> {
    Ok(Limits {
        tcp_rtt_4k_us: Latency::from_ns(rtt),
        tcp_stream_mib_s: tcp_stream(effort.stream_for)?,
        memcpy_mib_s: memcpy(effort.memcpy_rounds),
    })
}

const REQUEST: usize = 16;
const REPLY: usize = 4096;

fn loopback_listener() -> std::io::Result<TcpListener> {
    TcpListener::bind("127.0.0.1:0")
}

/// A raw TCP peer that answers every 16-byte request with 4 KiB, and a
/// connection to it.
///
/// On a VM, whether two threads share a vCPU changes a round trip by tens
/// of microseconds (a halted vCPU must be woken), and the scheduler decides
/// that anew all the time. So the raw round trip is measured one at a time
/// between the operations it is compared with, never in a block of its own.
#[derive(Debug)]
pub struct PingPong {
    conn: Option<TcpStream>,
    peer: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl PingPong {
    pub fn start() -> std::io::Result<Self> {
        let listener = loopback_listener()?;
        let addr = listener.local_addr()?;
        let peer = std::thread::spawn(move || -> std::io::Result<()> {
            let (mut s, _) = listener.accept()?;
            s.set_nodelay(true)?;
            let mut req = [0u8; REQUEST];
            let reply = [0x5au8; REPLY];
            loop {
                match s.read_exact(&mut req) {
                    Ok(()) => s.write_all(&reply)?,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        });
        let conn = TcpStream::connect(addr)?;
        conn.set_nodelay(true)?;
        Ok(Self {
            conn: Some(conn),
            peer: Some(peer),
        })
    }

    /// One round trip, timed.
    pub fn round_trip(&mut self) -> std::io::Result<Duration> {
        let c = self.conn.as_mut().expect("open until drop");
        let mut reply = [0u8; REPLY];
        let t = Instant::now();
        c.write_all(&[1u8; REQUEST])?;
        c.read_exact(&mut reply)?;
        Ok(t.elapsed())
    }
}

impl Drop for PingPong {
    fn drop(&mut self) {
        drop(self.conn.take());
        if let Some(p) = self.peer.take() {
            let _ = p.join();
        }
    }
}

/// Bytes a reader receives per second while a writer sends 1 MiB writes.
fn tcp_stream(duration: Duration) -> std::io::Result<f64> {
    let listener = loopback_listener()?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<(u64, Duration)> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        let mut started = None;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            started.get_or_insert_with(Instant::now);
            total += n as u64;
        }
        Ok((total, started.map(|t| t.elapsed()).unwrap_or_default()))
    });
    let mut w = TcpStream::connect(addr)?;
    let chunk = vec![0xa5u8; 1 << 20];
    let end = Instant::now() + duration;
    while Instant::now() < end {
        w.write_all(&chunk)?;
    }
    drop(w);
    let (bytes, took) = reader.join().expect("stream reader")?;
    Ok(mib(bytes) / took.as_secs_f64().max(1e-9))
}

fn memcpy(rounds: usize) -> f64 {
    let src = vec![0x3cu8; 64 << 20];
    let mut dst = vec![0u8; 64 << 20];
    dst.copy_from_slice(&src); // fault the destination in first
    let t = Instant::now();
    for r in 0..rounds {
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst[r % 64]);
    }
    mib((rounds * src.len()) as u64) / t.elapsed().as_secs_f64().max(1e-9)
}

pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}
