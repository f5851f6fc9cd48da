//! The admin listener: JSON API, actions that survive reloads, session lookup, reload,
//! metrics, authorization, and the documented curl examples.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use serde_json::Value;

const KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
const TOKEN: &str = "s3cret-admin-token-123";

async fn call(admin: SocketAddr, method: &str, path: &str, body: &str, token: Option<&str>) -> (u16, Value) {
    let mut c = Client::connect(admin).await;
    let mut r = Request::builder().method(method).uri(path).header("host", admin.to_string());
    if let Some(t) = token {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    let resp = c.request(r.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await;
    let v = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
    (resp.status.as_u16(), v)
}

fn sticky(b: &[DemoBackend], admin: &str) -> String {
    let refs: Vec<&DemoBackend> = b.iter().collect();
    format!(
        "{}\n[pools.web.affinity]\nkeys = [\"cookie\", \"header:x-user\"]\n[pools.web.affinity.cookie]\nkeys = [\"{KEY}\"]\n",
        config("round_robin", &refs, &[], &format!("[admin]\nbind = \"127.0.0.1:0\"\n{admin}"))
    )
}

fn backend<'a>(pools: &'a Value, name: &str) -> &'a Value {
    pools["backends"].as_array().unwrap().iter().find(|b| b["name"] == name).unwrap()
}

#[tokio::test]
async fn pools_drain_enable_weight_and_errors() {
    let b = backends(3).await;
    let t = Tether::start(&sticky(&b, ""));
    let admin = t.admin();
    for _ in 0..6 {
        get(t.addr(), "/").await;
    }
    let (s, v) = call(admin, "GET", "/api/pools", "", None).await;
    assert_eq!(s, 200);
    let web = &v["pools"][0];
    assert_eq!(web["name"], "web");
    assert_eq!(web["affinity"], "cookie,header");
    assert_eq!(backend(web, "app-1")["health"], "up");
    assert_eq!(backend(web, "app-1")["address"], b[0].address.to_string());
    assert_eq!(backend(web, "app-1")["requests"], 2);
    // The rate is measured once a second: six requests just now show up as a rate soon.
    let rate = std::cell::Cell::new(0.0);
    wait_until_async("app-1 shows a request rate", Duration::from_secs(5), || async {
        let (_, v) = call(admin, "GET", "/api/pools/web", "", None).await;
        rate.set(backend(&v, "app-1")["requests_per_second"].as_f64().unwrap());
        rate.get() > 0.0
    })
    .await;
    let rate = rate.get();
    assert!(rate > 0.0 && rate <= 2.5, "{rate}");

    let (s, v) = call(admin, "POST", "/api/pools/web/backends/app-1/drain", "", None).await;
    assert_eq!((s, v["admin_state"].as_str()), (200, Some("draining")));
    for _ in 0..9 {
        assert_ne!(get(t.addr(), "/").await.backend(), "app-1", "a drained backend took a new session");
    }
    // The drain survives a reload of a config that does not touch app-1 ...
    reload(&t, &sticky(&b, ""), "config reloaded").await;
    let (_, v) = call(admin, "GET", "/api/pools/web", "", None).await;
    assert_eq!(backend(&v, "app-1")["admin_state"], "draining");
    // ... and yields when the config itself changes app-1.
    let changed = sticky(&b, "").replace(
        &format!("name = \"app-1\", address = \"{}\", weight = 1", b[0].address),
        &format!("name = \"app-1\", address = \"{}\", weight = 2", b[0].address),
    );
    reload(&t, &changed, "config reloaded").await;
    let (_, v) = call(admin, "GET", "/api/pools/web", "", None).await;
    assert_eq!(backend(&v, "app-1")["admin_state"], "enabled");
    assert_eq!(backend(&v, "app-1")["weight"], 2);

    let (s, v) = call(admin, "PUT", "/api/pools/web/backends/app-3/weight", "{\"weight\": 5}", None).await;
    assert_eq!((s, &v["weight"]), (200, &Value::from(5)));
    let mut counts = std::collections::HashMap::new();
    for _ in 0..80 {
        *counts.entry(get(t.addr(), "/").await.backend()).or_insert(0) += 1;
    }
    assert_eq!((counts["app-1"], counts["app-2"], counts["app-3"]), (20, 10, 50), "weights 2, 1 and 5: {counts:?}");
    let (s, _) = call(admin, "POST", "/api/pools/web/backends/app-2/disable", "", None).await;
    assert_eq!(s, 200);
    for _ in 0..16 {
        assert_ne!(get(t.addr(), "/").await.backend(), "app-2", "a disabled backend took a request");
    }
    let (s, _) = call(admin, "POST", "/api/pools/web/backends/app-2/enable", "", None).await;
    assert_eq!(s, 200);

    for (method, path, body, status) in [
        ("GET", "/api/pools/nope", "", 404),
        ("POST", "/api/pools/web/backends/app-9/drain", "", 404),
        ("POST", "/api/pools/web/backends/app-1/explode", "", 404),
        ("PUT", "/api/pools/web/backends/app-1/weight", "{\"weight\": 0}", 400),
        ("PUT", "/api/pools/web/backends/app-1/weight", "not json", 400),
        ("GET", "/api/nothing", "", 404),
    ] {
        let (s, v) = call(admin, method, path, body, None).await;
        assert_eq!(s, status, "{method} {path}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{method} {path}: {v}");
    }
}

#[tokio::test]
async fn sessions_are_explained_and_unpinned() {
    let b = backends(3).await;
    let t = Tether::start(&sticky(&b, ""));
    let admin = t.admin();
    let r = get(t.addr(), "/").await;
    let token =
        r.headers.get_all("set-cookie").iter().map(|v| v.to_str().unwrap()).find(|c| c.starts_with("tether=")).unwrap();
    let token = token.split(';').next().unwrap().trim_start_matches("tether=").to_string();
    let (s, v) = call(admin, "GET", &format!("/api/pools/web/sessions?key={token}"), "", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["kind"], "cookie");
    assert_eq!(v["backend"], r.backend());
    assert!(v["why"].as_str().unwrap().contains("the token pins it"), "{v}");
    let (s, _) = call(admin, "DELETE", &format!("/api/pools/web/sessions?key={token}"), "", None).await;
    assert_eq!(s, 409, "tokens cannot be unpinned");
    let (_, v) = call(admin, "GET", "/api/pools/web/sessions?key=forged&kind=cookie", "", None).await;
    assert!(v["why"].as_str().unwrap().contains("not a valid token"), "{v}");

    // A header key learned in the stick table.
    let mut c = Client::connect(t.addr()).await;
    let req = || Request::get("/").header("host", "x").header("x-user", "ada").body(Full::default()).unwrap();
    let home = c.request(req()).await.backend();
    let (_, v) = call(admin, "GET", "/api/pools/web/sessions?key=ada&kind=header", "", None).await;
    assert_eq!(v["backend"], home, "{v}");
    let (s, v) = call(admin, "DELETE", "/api/pools/web/sessions?key=ada&kind=header", "", None).await;
    assert_eq!((s, &v["unpinned"]), (200, &Value::Bool(true)));
    let (_, v) = call(admin, "GET", "/api/pools/web/sessions?key=ada&kind=header", "", None).await;
    assert!(v["backend"].is_null() && v["why"].as_str().unwrap().contains("not in the stick table"), "{v}");
    // Round robin places the unpinned key on the next backend.
    assert_ne!(c.request(req()).await.backend(), home);
}

#[tokio::test]
async fn reload_through_the_api_reports_the_diff_or_the_errors() {
    let b = backends(2).await;
    let cfg = sticky(&b, "");
    let t = Tether::start(&cfg);
    let admin = t.admin();
    std::fs::write(&t.config, cfg.replace("algorithm = \"round_robin\"", "algorithm = \"least_conn\"")).unwrap();
    let (s, v) = call(admin, "POST", "/api/reload", "", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["changes"][0], "pool \"web\": settings changed");
    std::fs::write(&t.config, cfg.replace("algorithm = \"round_robin\"", "algorithm = \"fastest\"")).unwrap();
    let (s, v) = call(admin, "POST", "/api/reload", "", None).await;
    assert_eq!(s, 422, "{v}");
    assert!(v["errors"][0].as_str().unwrap().contains("algorithm \"fastest\" is not known"), "{v}");
    assert!(v["errors"][0].as_str().unwrap().starts_with(&t.config.display().to_string()), "{v}");
    assert_eq!(get(t.addr(), "/").await.status, 200);
}

#[tokio::test]
async fn writes_need_the_token_and_traffic_listeners_never_serve_admin() {
    let b = backends(1).await;
    let t = Tether::start(&sticky(&b, &format!("token = \"{TOKEN}\"\n")));
    let admin = t.admin();
    assert_eq!(call(admin, "GET", "/api/pools", "", None).await.0, 200, "reads on loopback are open");
    // The admin paths on a traffic listener go to the backend like any other request.
    let r = get(t.addr(), "/api/pools").await;
    assert_eq!(r.backend(), "app-1");
    let r = get(t.addr(), "/metrics").await;
    assert!(!r.text().contains("tether_"), "{}", r.text());
    assert_eq!(call(admin, "POST", "/api/pools/web/backends/app-1/drain", "", None).await.0, 401);
    assert_eq!(
        call(admin, "POST", "/api/pools/web/backends/app-1/drain", "", Some("wrong-token-wrong-token")).await.0,
        401
    );
    assert_eq!(call(admin, "POST", "/api/pools/web/backends/app-1/drain", "", Some(TOKEN)).await.0, 200);
}

#[test]
fn an_open_admin_listener_needs_a_token() {
    let s = Scratch::new();
    let p = s.write("t.toml", "[admin]\nbind = \"0.0.0.0:9901\"\n[[listeners]]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n[pools.p]\nbackends = [{ address = \"127.0.0.1:1\" }]\n");
    let out = std::process::Command::new(bin()).arg("check").arg("-c").arg(&p).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(":2:8: admin.bind 0.0.0.0:9901 is not a loopback address: set admin.token"), "{err}");
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let b = backends(2).await;
    let t = Tether::start(&sticky(&b, ""));
    let mut c = Client::connect(t.addr()).await;
    for _ in 0..4 {
        c.get("/").await;
    }
    c.get("/status?code=503").await;
    // A request is counted when it ends, which may be just after its client has the answer.
    let responses = |text: &str, class: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with("tether_backend_responses_total{") && l.contains(class))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    let admin = t.admin();
    wait_until_async("the metrics count five responses", Duration::from_secs(5), || async move {
        responses(&get(admin, "/metrics").await.text(), "") >= 5
    })
    .await;
    let r = get(admin, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = r.text();
    for want in [
        "tether_listener_requests_total{listener=\"web\"} 5",
        "tether_listener_connections_open{listener=\"web\"} 1",
        "tether_backend_responses_total{pool=\"web\",backend=\"app-1\",class=\"5xx\"}",
        "tether_backend_healthy{pool=\"web\",backend=\"app-1\"} 1",
        "tether_backend_admin_state{pool=\"web\",backend=\"app-1\",state=\"enabled\"} 1",
        "tether_affinity_outcomes_total{pool=\"web\",backend=\"app-1\",outcome=\"new\"}",
        "tether_backend_request_duration_seconds_bucket{le=\"0.001\",pool=\"web\",backend=\"app-1\"}",
        "tether_backend_sessions{pool=\"web\",backend=\"app-2\"}",
        "tether_stick_table_entries{pool=\"web\"} 0",
        "tether_pool_retries_total{pool=\"web\"} 0",
        "# EOF",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert_eq!(responses(&text, ""), 5);
    assert_eq!(responses(&text, "class=\"5xx\""), 1);
}

#[tokio::test]
async fn the_documented_curl_examples_work() {
    let b = backends(2).await;
    let t = Tether::start(
        &(sticky(&b, &format!("token = \"{TOKEN}\"\n"))
            .replace("app-1", "shop-1")
            .replace("app-2", "shop-2")
            .replace("[pools.web", "[pools.shop")
            .replace("pool = \"web\"", "pool = \"shop\"")
            + &format!(
                "[[listeners.routes]]\npath_prefix = \"/release\"\nname = \"release\"\n\
                 split = [{{ pool = \"blue\", weight = 90 }}, {{ pool = \"green\", weight = 10 }}]\n\
                 [pools.blue]\nbackends = [{{ name = \"blue-1\", address = \"{}\" }}]\n\
                 [pools.green]\nbackends = [{{ name = \"green-1\", address = \"{}\" }}]\n",
                b[0].address, b[1].address
            )),
    );
    get(t.addr(), "/").await;
    let mut c = Client::connect(t.addr()).await;
    c.request(Request::get("/").header("host", "x").header("x-user", "ada").body(Full::default()).unwrap()).await;
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/admin-api.md")).unwrap();
    let admin = format!("http://{}", t.admin());
    let mut ran = 0;
    for line in doc.lines().filter(|l| l.starts_with("curl ")) {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(line)
            .env("ADMIN", &admin)
            .env("TOKEN", TOKEN)
            .env("CONFIG", &t.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{line}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ran += 1;
    }
    assert!(ran >= 8, "only {ran} examples found");
}
