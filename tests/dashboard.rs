//! The dashboard in a real browser: headless Chromium driven by Playwright
//! (`tests/dashboard/check.mjs`) opens the admin page, finds the backends and the traffic
//! splits, clicks Drain and sees the state change through the API, and saves a
//! screenshot.
//!
//! Needs `/usr/bin/chromium` and `playwright-core` under `target/pw/node_modules`, which
//! `.ci/setup` installs.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_backends_and_drains_one() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let node_path = root.join("target/pw/node_modules");
    assert!(
        node_path.join("playwright-core").exists() && std::path::Path::new("/usr/bin/chromium").exists(),
        "the dashboard test needs Chromium and playwright-core: run .ci/setup first"
    );
    let b = backends(3).await;
    let refs: Vec<&DemoBackend> = b.iter().collect();
    // A traffic split on /release between pool web and a canary pool of the same
    // backends, for the splits table.
    let affinity = "keys = [\"cookie\"]\n[AFF.cookie]\nkeys = [\"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\"]\ntoken_version = 2\n";
    let cfg = format!(
        "{}\n[pools.web.affinity]\n{}\n[[listeners.routes]]\npath_prefix = \"/release\"\nname = \"release\"\n\
         split = [{{ pool = \"web\", weight = 90 }}, {{ pool = \"web-canary\", weight = 10 }}]\n\
         [pools.web-canary]\nbackends = [{{ name = \"canary-1\", address = \"{}\" }}]\n[pools.web-canary.affinity]\n{}",
        config("round_robin", &refs, &[], "[admin]\nbind = \"127.0.0.1:0\"\n"),
        affinity.replace("AFF", "pools.web.affinity"),
        b[0].address,
        affinity.replace("AFF", "pools.web-canary.affinity"),
    );
    let t = Tether::start(&cfg);
    for _ in 0..9 {
        get(t.addr(), "/").await;
    }
    for _ in 0..5 {
        get(t.addr(), "/release/").await;
    }
    let screenshot = root.join("target/dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let url = format!("http://{}/", t.admin());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(root.join("tests/dashboard/check.mjs"))
            .arg(&url)
            .arg(&screenshot)
            .env("NODE_PATH", &node_path)
            .output()
            .expect("node runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "browser check failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let found = stdout.lines().find_map(|l| l.strip_prefix("BACKENDS ")).expect("the page listed backends");
    for name in ["app-1", "app-2", "app-3"] {
        assert!(found.contains(name), "{name} missing from {found}");
    }
    let splits = stdout.lines().find_map(|l| l.strip_prefix("SPLITS ")).expect("the page listed the splits");
    let rows: Vec<Vec<String>> = serde_json::from_str(splits).unwrap();
    let requests: u64 = rows.iter().map(|r| r[5].replace(',', "").parse::<u64>().unwrap()).sum();
    assert_eq!(rows[0][..5], ["release", "web */release", "web", "90", "90%"], "{rows:?}");
    assert_eq!(rows[1][2..5], ["web-canary", "10", "10%"], "{rows:?}");
    assert_eq!(requests, 5, "{rows:?}");
    let drained =
        stdout.lines().find_map(|l| l.strip_prefix("DRAINED ")).expect("a backend was drained").trim().to_string();
    // The click went through the API: the backend really is draining.
    let r = get(t.admin(), "/api/pools/web").await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let state = v["backends"].as_array().unwrap().iter().find(|b| b["name"] == drained.as_str()).unwrap()
        ["admin_state"]
        .clone();
    assert_eq!(state, "draining");
    assert!(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/dashboard.png").exists(), "no screenshot");
}
