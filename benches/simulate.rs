//! Simulated requests per second of `tether simulate`, one strategy per benchmark.
//!
//! `cargo bench --bench simulate`. One iteration is a whole run of one strategy over the
//! same workload: 10 backends, 20 000 clients arriving over 2 minutes, sessions of about
//! 30 requests 10 s apart, 10 minutes of simulated time (about 700 000 requests), one
//! backend failing at 5 minutes. Criterion's throughput line (`thrpt`, in elements per
//! second) is simulated requests per second, on one core: a run is single-threaded.
//!
//! The `replay` group replays a JSON access log of 500 000 requests (written by the bench
//! in Tether's format) from a file: its throughput counts the lines parsed and simulated.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tether::simulate::{self, Scenario};

fn scenario(pool: &str) -> Scenario {
    let backends: Vec<String> =
        (1..=10).map(|i| format!("{{ name = \"app-{i}\", address = \"10.0.0.{i}:8080\" }}")).collect();
    let src = format!(
        r#"
[simulate]
duration = "10m"
[workload]
clients = 20000
ramp = "2m"
requests_per_session = "exp(30)"
think_time = "exp(10s)"
away_time = "exp(5m)"
[[events]]
at = "5m"
action = "fail"
backend = "app-3"
[pools.p]
backends = [{}]
[pools.p.health]
check = "tcp"
interval = "2s"
{pool}
"#,
        backends.join(", ")
    );
    simulate::scenario::parse(&src, "bench.toml", None).unwrap_or_else(|e| panic!("{e}"))
}

fn simulate(c: &mut Criterion) {
    let mut g = c.benchmark_group("simulate");
    g.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(8)).sample_size(10);
    let strategies = [
        ("client_ip_hash", "[pools.p.affinity]\nkeys = [\"client_ip\"]\nmapping = \"hash\""),
        ("client_ip_table", "[pools.p.affinity]\nkeys = [\"client_ip\"]"),
        ("cookie_v2", "[pools.p.affinity]\nkeys = [\"cookie\"]\n[pools.p.affinity.cookie]\ntoken_version = 2"),
        ("round_robin_no_affinity", ""),
    ];
    for (name, pool) in strategies {
        let sc = scenario(pool);
        let requests = simulate::run(&sc, None, &mut |_, _| {}).strategies[0].requests;
        g.throughput(Throughput::Elements(requests));
        g.bench_function(name, |bench| bench.iter(|| simulate::run(&sc, None, &mut |_, _| {})));
    }
    g.finish();
}

/// A JSON access log as Tether writes it: `lines` requests over 10 backends of pool `p`,
/// 1000 a second, from 20 000 sessions (one request in ten of no session).
fn write_log(path: &std::path::Path, lines: u64) {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut rng = simulate::engine::Rng::new(5);
    let mut seen = vec![None; 20_000];
    let start = 1_800_000_000_000u64;
    for k in 0..lines {
        let ms = start + k;
        let (secs, frac) = (ms / 1000, ms % 1000);
        let (h, m, s) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
        let x = rng.next_u64();
        let (session, verdict, backend) = if x.is_multiple_of(10) {
            ("null".to_string(), "new", x % 10 + 1)
        } else {
            let id = (x >> 8) as usize % seen.len();
            let (verdict, b) = match seen[id] {
                Some(b) => ("hit", b),
                None => ("new", (x >> 40) % 10 + 1),
            };
            seen[id] = Some(b);
            (format!("\"{:016x}\"", (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)), verdict, b)
        };
        writeln!(
            out,
            "{{\"time\":\"2027-01-15T{h:02}:{m:02}:{s:02}.{frac:03}Z\",\"client\":\"10.1.2.3:51234\",\"listener\":\"web\",\"method\":\"GET\",\"uri\":\"/cart?item=12\",\"protocol\":\"HTTP/1.1\",\"status\":200,\"pool\":\"p\",\"backend\":\"app-{backend}\",\"upstream_ms\":1.204,\"total_ms\":1.391,\"bytes_in\":0,\"bytes_out\":512,\"affinity\":\"{verdict}\",\"session\":{session},\"error\":null}}"
        )
        .unwrap();
    }
}

/// Replaying a log of 500 000 lines (about 300 bytes each), streamed from a
/// file: parsing each line and simulating its request, per strategy.
fn replay(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("tether-bench-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_log(&dir.join("access.log"), 500_000);
    let mut g = c.benchmark_group("replay");
    g.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(8)).sample_size(10);
    let backends: Vec<String> =
        (1..=10).map(|i| format!("{{ name = \"app-{i}\", address = \"10.0.0.{i}:8080\" }}")).collect();
    let strategies = [
        ("cookie_v2", "[pools.p.affinity]\nkeys = [\"cookie\"]\n[pools.p.affinity.cookie]\ntoken_version = 2"),
        ("client_ip_hash", "[pools.p.affinity]\nkeys = [\"client_ip\"]\nmapping = \"hash\""),
        ("round_robin_no_affinity", ""),
    ];
    for (name, pool) in strategies {
        let src = format!(
            "[simulate]\n[workload]\nreplay = \"access.log\"\n[pools.p]\nbackends = [{}]\n{pool}\n",
            backends.join(", ")
        );
        let sc = simulate::scenario::parse(&src, "bench.toml", Some(&dir)).unwrap_or_else(|e| panic!("{e}"));
        let requests = simulate::run(&sc, None, &mut |_, _| {}).strategies[0].requests;
        g.throughput(Throughput::Elements(requests));
        g.bench_function(name, |bench| bench.iter(|| simulate::run(&sc, None, &mut |_, _| {})));
    }
    g.finish();
    let _ = std::fs::remove_dir_all(dir);
}

criterion_group!(benches, simulate, replay);
criterion_main!(benches);
