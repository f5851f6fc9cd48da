//! The command line: check, help, version, and config errors with their locations.

mod common;

use std::process::Command;

use common::*;

#[test]
fn the_example_config_passes_check() {
    let out = Command::new(bin())
        .args(["check", "-c", concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tether.toml")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 listeners, 4 pools, 6 backends, 2 dns sources)"));
}

#[test]
fn every_example_config_passes_check() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut checked = Vec::new();
    for e in std::fs::read_dir(format!("{root}/examples")).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        // From the repository's root, as the examples say: certificate paths are relative.
        let out = Command::new(bin()).arg("check").arg("-c").arg(&path).current_dir(root).output().unwrap();
        assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        checked.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    checked.sort();
    assert_eq!(checked, ["grpc.toml", "https.toml", "tcp.toml", "tether.toml"]);
}

#[test]
fn check_reports_located_errors_and_fails() {
    let s = Scratch::new();
    let path = s.write(
        "tether.toml",
        "[[listeners]]\nbind = \"127.0.0.1:8080\"\npool = \"shop\"\n\n[pools.shop]\nbackends = [\n  { name = \"app-2\", address = \"10.0.0.2\" },\n]\n",
    );
    let out = Command::new(bin()).arg("check").arg("-c").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!("{}:7:31: pool \"shop\": backend \"app-2\": address \"10.0.0.2\" has no port", path.display());
    assert!(err.contains(&want), "{err}");
}

#[test]
fn run_refuses_a_bad_config() {
    let s = Scratch::new();
    let path = s.write("tether.toml", "[[listeners]]\nbind = \"127.0.0.1:0\"\npool = \"shop\"\ncolour = \"blue\"\n");
    let out = Command::new(bin()).arg("run").arg("-c").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:4:1: unknown field `colour`", path.display())), "{err}");
}

#[test]
fn missing_file_is_named() {
    let out = Command::new(bin()).args(["check", "-c", "/nonexistent/tether.toml"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tether.toml: cannot read"));
}

#[test]
fn help_and_version() {
    let out = Command::new(bin()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "check", "demo"] {
        assert!(help.contains(cmd), "{help}");
    }
    let out = Command::new(bin()).arg("--version").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("tether {}", env!("CARGO_PKG_VERSION")));
}

#[tokio::test]
async fn demo_answers_from_three_backends_in_turn_over_http_and_https() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(bin())
        .args(["demo", "--port", "0", "--https-port", "0", "--backend-port", "0", "--admin-port", "0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap()).lines().map_while(Result::ok);
    let mut listening = |name: &str| -> std::net::SocketAddr {
        let tag = format!("listener={name}");
        err.find_map(|l| {
            let rest = l.split("listening on ").nth(1)?;
            rest.ends_with(&tag).then(|| rest.split_whitespace().next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("the demo said where {name} listens"))
    };
    let addr = listening("demo");
    let tls_addr = listening("demo-tls");
    let mut seen = Vec::new();
    for _ in 0..3 {
        let r = get(addr, "/").await;
        assert!(r.text().contains("visit number 1"), "{}", r.text());
        seen.push(r.backend());
    }
    seen.sort();
    assert_eq!(seen, ["app-1", "app-2", "app-3"]);
    // The tour's HTTPS line: HTTP/2 over TLS, a Secure session cookie. curl runs off this
    // thread (as the demo does, the backends run in the demo's process, not here).
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl").args(["-sk", "--http2", "-i"]).arg(format!("https://{tls_addr}/")).output().unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(text.starts_with("http/2 200"), "{text}");
    let cookie = text.lines().find(|l| l.starts_with("set-cookie: tether=")).unwrap_or_else(|| panic!("{text}"));
    assert!(cookie.contains("; secure"), "{cookie}");
    let _ = child.kill();
    let _ = child.wait();
}
