//! Micro-benchmarks for the NBD wire codecs in `replblk-proto`: the
//! per-request hot path (request header decode/encode, simple reply header)
//! and the handshake's `NBD_OPT_GO` data.
//!
//! Run with `cargo bench --bench codec`; `cargo bench --bench codec -- --test`
//! runs every benchmark once as a smoke test.

use std::hint::black_box;
use std::io::Cursor;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use replblk_proto::nbd::{info, Command, InfoRequest, Request, SimpleReply, MAX_STRING};

/// Requests in the batched decode benchmark, roughly one queue depth.
const BATCH: usize = 64;

fn sample_request(i: u64) -> Request {
    Request {
        flags: 0,
        // Alternate reads and writes.
        command: [Command::Read, Command::Write][(i % 2) as usize],
        cookie: i,
        offset: i * 4096,
        length: 4096,
    }
}

fn encode_info_request(req: &InfoRequest) -> Vec<u8> {
    let mut buf = BytesMut::new();
    req.encode(&mut buf);
    buf.to_vec()
}

fn bench_request(c: &mut Criterion) {
    let mut group = c.benchmark_group("request");

    let mut one = BytesMut::new();
    sample_request(7).encode(&mut one);
    let one = one.to_vec();
    group.throughput(Throughput::Bytes(Request::LEN as u64));
    group.bench_function("decode", |b| {
        b.iter(|| {
            let mut cur = Cursor::new(black_box(one.as_slice()));
            Request::decode(&mut cur)
        })
    });

    let mut many = BytesMut::new();
    for i in 0..BATCH as u64 {
        sample_request(i).encode(&mut many);
    }
    let many = many.to_vec();
    group.throughput(Throughput::Bytes(many.len() as u64));
    group.bench_function("decode_batch_64", |b| {
        b.iter(|| {
            let mut cur = Cursor::new(black_box(many.as_slice()));
            let mut n = 0usize;
            while let Ok(Some(req)) = Request::decode(&mut cur) {
                black_box(req);
                n += 1;
            }
            assert_eq!(n, BATCH);
        })
    });

    let req = sample_request(7);
    group.throughput(Throughput::Bytes(Request::LEN as u64));
    group.bench_function("encode", |b| {
        let mut buf = BytesMut::with_capacity(Request::LEN);
        b.iter(|| {
            buf.clear();
            black_box(&req).encode(&mut buf);
            black_box(&buf);
        })
    });

    group.finish();
}

fn bench_simple_reply(c: &mut Criterion) {
    let mut group = c.benchmark_group("simple_reply");
    group.throughput(Throughput::Bytes(SimpleReply::LEN as u64));
    let reply = SimpleReply {
        error: 0,
        cookie: 0x0123_4567_89ab_cdef,
    };
    group.bench_function("to_bytes", |b| b.iter(|| black_box(&reply).to_bytes()));
    group.finish();
}

fn bench_info_request(c: &mut Criterion) {
    let mut group = c.benchmark_group("info_request");

    let typical = encode_info_request(&InfoRequest {
        name: "disk0".to_owned(),
        requests: vec![info::NAME, info::BLOCK_SIZE],
    });
    group.throughput(Throughput::Bytes(typical.len() as u64));
    group.bench_function("decode_data_typical", |b| {
        b.iter(|| InfoRequest::decode_data(black_box(&typical)))
    });

    let longest = encode_info_request(&InfoRequest {
        name: "é".repeat(MAX_STRING / 2),
        requests: vec![
            info::EXPORT,
            info::NAME,
            info::DESCRIPTION,
            info::BLOCK_SIZE,
        ],
    });
    group.throughput(Throughput::Bytes(longest.len() as u64));
    group.bench_function("decode_data_4096_byte_name", |b| {
        b.iter(|| InfoRequest::decode_data(black_box(&longest)))
    });

    group.finish();
}

criterion_group!(
    benches,
    bench_request,
    bench_simple_reply,
    bench_info_request
);
criterion_main!(benches);
