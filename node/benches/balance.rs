//! Consistent-hash costs and quality: the balanced rendezvous table (used)
//! vs Maglev.
//!
//! ```text
//! cargo bench -p gossamer-node --bench balance
//! ```
//! The quality figures (balance over 10 M keys, movement on add/remove) are
//! printed once before the timings (about a minute; `BALANCE_TIMINGS_ONLY=1`
//! skips them).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use gossamer_node::balance::{
    maglev::Maglev,
    rendezvous::{self, Table},
};

fn names(n: usize) -> Vec<(String, u32)> {
    (0..n).map(|i| (format!("node{i}/web-{i}"), 1)).collect()
}

fn quality() {
    println!(
        "n      algo        max/avg(10M keys)  moved-on-add/ideal  moved-on-remove/ideal  max/avg(slots)"
    );
    for n in [3usize, 10, 100, 1000] {
        let keys = 10_000_000u64;
        let r = Table::build(&names(n));
        let m = Maglev::build(&names(n));
        let mut load_r = vec![0u64; n];
        let mut load_m = vec![0u64; n];
        for k in 0..keys {
            let h = rendezvous::hash_key(&k.to_le_bytes());
            load_r[r.lookup(h).unwrap()] += 1;
            load_m[m.lookup(h).unwrap()] += 1;
        }
        let avg = keys as f64 / n as f64;
        let bal = |l: &[u64]| *l.iter().max().unwrap() as f64 / avg;
        // Movement measured on keys: add one backend, remove backend 0.
        let r_add = Table::build(&names(n + 1));
        let m_add = Maglev::build(&names(n + 1));
        let rest: Vec<(String, u32)> = names(n).into_iter().skip(1).collect();
        let r_rm = Table::build(&rest);
        let m_rm = Maglev::build(&rest);
        let sample = 1_000_000u64;
        let (mut ra, mut ma, mut rr, mut mr) = (0u64, 0u64, 0u64, 0u64);
        for k in 0..sample {
            let h = rendezvous::hash_key(&k.to_le_bytes());
            ra += u64::from(r.lookup(h) != r_add.lookup(h));
            ma += u64::from(m.lookup(h) != m_add.lookup(h));
            // After removing backend 0, index i becomes i - 1.
            rr += u64::from(r.lookup(h).map(|i| i.wrapping_sub(1)) != r_rm.lookup(h));
            mr += u64::from(m.lookup(h).map(|i| i.wrapping_sub(1)) != m_rm.lookup(h));
        }
        let ideal_add = sample as f64 / (n + 1) as f64;
        let ideal_rm = sample as f64 / n as f64;
        let shares = r.shares();
        let slots_avg = r.slots() as f64 / n as f64;
        println!(
            "{n:<6} rendezvous  {:<18.4} {:<19.3} {:<22.3} {:.4}",
            bal(&load_r),
            ra as f64 / ideal_add,
            rr as f64 / ideal_rm,
            *shares.iter().max().unwrap() as f64 / slots_avg
        );
        println!(
            "{n:<6} maglev      {:<18.4} {:<19.3} {:.3}",
            bal(&load_m),
            ma as f64 / ideal_add,
            mr as f64 / ideal_rm
        );
    }
}

fn bench(c: &mut Criterion) {
    if std::env::var_os("BALANCE_TIMINGS_ONLY").is_none() {
        quality();
    }
    let mut lookup = c.benchmark_group("lookup");
    for n in [3usize, 100, 1000] {
        let r = Table::build(&names(n));
        let m = Maglev::build(&names(n));
        let key = b"user-12345678";
        lookup.bench_with_input(BenchmarkId::new("rendezvous", n), &n, |b, _| {
            b.iter(|| r.lookup(rendezvous::hash_key(black_box(key))))
        });
        lookup.bench_with_input(BenchmarkId::new("maglev", n), &n, |b, _| {
            b.iter(|| m.lookup(rendezvous::hash_key(black_box(key))))
        });
    }
    lookup.finish();
    let mut build = c.benchmark_group("build");
    build.sample_size(10);
    for n in [3usize, 100, 1000] {
        let list = names(n);
        build.bench_with_input(BenchmarkId::new("rendezvous", n), &n, |b, _| {
            b.iter(|| Table::build(black_box(&list)))
        });
        build.bench_with_input(BenchmarkId::new("maglev", n), &n, |b, _| {
            b.iter(|| Maglev::build(black_box(&list)))
        });
    }
    build.finish();
    // An instance change at n instances: the table updated from the
    // previous one (what agents do), against building it whole (above).
    let mut update = c.benchmark_group("update");
    update.sample_size(20);
    for n in [100usize, 1000] {
        let before = names(n);
        let table = Table::build(&before);
        let old = rendezvous::Scorer::new(&before);
        let mut fewer = before.clone();
        fewer.remove(n / 2);
        let mut more = before.clone();
        more.push((format!("node{n}/web-new"), 1));
        for (what, after) in [("remove1", fewer), ("add1", more)] {
            let new = rendezvous::Scorer::new(&after);
            assert_eq!(
                table.updated(&old, &new).as_ref(),
                Some(&Table::build(&after))
            );
            update.bench_with_input(BenchmarkId::new(what, n), &n, |b, _| {
                b.iter(|| table.updated(black_box(&old), black_box(&new)))
            });
        }
    }
    update.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
