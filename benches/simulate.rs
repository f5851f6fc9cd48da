//! Simulated requests per second of `tether simulate`, one strategy per benchmark.
//!
//! `cargo bench --bench simulate`. One iteration is a whole run of one strategy over the
//! same workload: 10 backends, 20 000 clients arriving over 2 minutes, sessions of about
//! 30 requests 10 s apart, 10 minutes of simulated time (about 700 000 requests), one
//! backend failing at 5 minutes. Criterion's throughput line (`thrpt`, in elements per
//! second) is simulated requests per second, on one core: a run is single-threaded.

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

criterion_group!(benches, simulate);
criterion_main!(benches);
