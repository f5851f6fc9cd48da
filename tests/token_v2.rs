//! Token version 2 through the real balancer, and the two-phase rollout: an instance with
//! `token_version = 2` issues version 2 cookies that keep their sessions; version 1
//! cookies keep their backends at such an instance (and are refreshed into version 2);
//! version 2 cookies keep their backends at an instance that still issues version 1.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use http::Request;
use http_body_util::Full;
use tether::affinity::hash::backend_id;
use tether::affinity::pool_id;
use tether::affinity::token::{KeyRing, Token, Version};

const KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

/// The pool `web` of `b` with Tether's cookie sealed with [`KEY`]; `cookie_extra` goes
/// into the `[cookie]` table.
fn sticky(b: &[DemoBackend], cookie_extra: &str) -> String {
    let refs: Vec<&DemoBackend> = b.iter().collect();
    format!(
        "{}\n[pools.web.affinity]\nkeys = [\"cookie\"]\n\n[pools.web.affinity.cookie]\nkeys = [\"{KEY}\"]\n{cookie_extra}\n",
        config("round_robin", &refs, &[], "")
    )
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// The value of Tether's cookie if the response sets it.
fn set_token(r: &Resp) -> Option<String> {
    r.headers
        .get_all("set-cookie")
        .iter()
        .find_map(|v| Some(v.to_str().ok()?.strip_prefix("tether=")?.split(';').next()?.to_string()))
}

/// The version byte of a cookie value: the first byte of its base64url decoding.
fn version_byte(token: &str) -> u8 {
    URL_SAFE_NO_PAD.decode(token).expect("a token is base64url")[0]
}

async fn with_cookie(c: &mut Client, token: &str) -> Resp {
    let req = Request::get("/")
        .header("host", "shop.example")
        .header("cookie", format!("lang=en; tether={token}"))
        .body(Full::default())
        .unwrap();
    let r = c.request(req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r
}

/// A cookie sealed with [`KEY`] as `version`, pinned to `backend` of pool `web`, last
/// seen `idle` seconds ago.
fn sealed(version: Version, backend: &str, idle: u64) -> String {
    let now = unix_now();
    let t = Token {
        backend: backend_id("web", backend),
        pool: Some(pool_id("web")),
        session: *b"rollout-session!",
        issued: now - idle,
        last_seen: now - idle,
    };
    KeyRing::from_base64([KEY]).unwrap().seal_as(version, &t).to_string()
}

#[tokio::test]
async fn token_version_2_issues_v2_cookies_that_keep_the_session() {
    let b = backends(3).await;
    let t = Tether::start(&sticky(&b, "token_version = 2"));
    let mut c = Client::connect(t.addr()).await;
    for _ in 0..3 {
        let first = get(t.addr(), "/").await;
        let token = set_token(&first).expect("a new session gets Tether's cookie");
        assert_eq!((token.len(), version_byte(&token)), (Version::V2.str_len(), 2), "{token}");
        let opened = KeyRing::from_base64([KEY]).unwrap().open(&token).unwrap();
        assert_eq!(opened.pool, Some(pool_id("web")));
        assert_eq!(opened.backend, backend_id("web", &first.backend()));
        for _ in 0..5 {
            let r = with_cookie(&mut c, &token).await;
            assert_eq!(r.backend(), first.backend());
            assert_eq!(set_token(&r), None, "a fresh cookie is not set again");
        }
    }
}

#[tokio::test]
async fn a_v1_cookie_keeps_its_backend_at_an_instance_issuing_v2() {
    let b = backends(3).await;
    let v2 = Tether::start(&sticky(&b, "token_version = 2"));
    let mut c = Client::connect(v2.addr()).await;
    // Sealed by hand, for every backend: round robin alone would place some correctly.
    for backend in &b {
        let cookie = sealed(Version::V1, &backend.name, 0);
        assert_eq!(version_byte(&cookie), 1);
        for _ in 0..3 {
            let r = with_cookie(&mut c, &cookie).await;
            assert_eq!(r.backend(), backend.name);
            assert_eq!(set_token(&r), None);
        }
        // Due for a refresh (idle for more than a quarter of the 30 min idle timeout):
        // same backend, and the refreshed cookie is version 2 with the same session.
        let r = with_cookie(&mut c, &sealed(Version::V1, &backend.name, 600)).await;
        assert_eq!(r.backend(), backend.name);
        let refreshed = set_token(&r).expect("refreshed");
        assert_eq!(version_byte(&refreshed), 2);
        let opened = KeyRing::from_base64([KEY]).unwrap().open(&refreshed).unwrap();
        assert_eq!((opened.session, opened.pool), (*b"rollout-session!", Some(pool_id("web"))));
        assert_eq!(with_cookie(&mut c, &refreshed).await.backend(), backend.name);
    }
    // A cookie a version 1 instance issued, at the version 2 instance.
    let v1 = Tether::start(&sticky(&b, ""));
    let first = get(v1.addr(), "/").await;
    let issued = set_token(&first).unwrap();
    assert_eq!(version_byte(&issued), 1);
    for _ in 0..3 {
        assert_eq!(with_cookie(&mut c, &issued).await.backend(), first.backend());
    }
}

#[tokio::test]
async fn a_v2_cookie_keeps_its_backend_at_an_instance_issuing_v1() {
    let b = backends(3).await;
    let v1 = Tether::start(&sticky(&b, ""));
    let mut c = Client::connect(v1.addr()).await;
    for backend in &b {
        let cookie = sealed(Version::V2, &backend.name, 0);
        assert_eq!(version_byte(&cookie), 2);
        for _ in 0..3 {
            let r = with_cookie(&mut c, &cookie).await;
            assert_eq!(r.backend(), backend.name);
            assert_eq!(set_token(&r), None);
        }
        // Refreshed by this instance: version 1 again, same backend.
        let r = with_cookie(&mut c, &sealed(Version::V2, &backend.name, 600)).await;
        assert_eq!(r.backend(), backend.name);
        assert_eq!(version_byte(&set_token(&r).expect("refreshed")), 1);
    }
    // A cookie a version 2 instance issued, at the version 1 instance.
    let v2 = Tether::start(&sticky(&b, "token_version = 2"));
    let first = get(v2.addr(), "/").await;
    let issued = set_token(&first).unwrap();
    assert_eq!(version_byte(&issued), 2);
    for _ in 0..3 {
        assert_eq!(with_cookie(&mut c, &issued).await.backend(), first.backend());
    }
}

#[tokio::test]
async fn a_v2_cookie_of_another_pool_starts_a_new_session() {
    let b = backends(3).await;
    let t = Tether::start(&sticky(&b, "token_version = 2"));
    let mut c = Client::connect(t.addr()).await;
    let now = unix_now();
    let elsewhere = Token {
        backend: backend_id("web", &b[2].name),
        pool: Some(pool_id("another-pool")),
        session: [3; 16],
        issued: now,
        last_seen: now,
    };
    let cookie = KeyRing::from_base64([KEY]).unwrap().seal_as(Version::V2, &elsewhere).to_string();
    let r = with_cookie(&mut c, &cookie).await;
    let replaced = set_token(&r).expect("counts as absent: a new session and cookie");
    let opened = KeyRing::from_base64([KEY]).unwrap().open(&replaced).unwrap();
    assert_ne!(opened.session, [3; 16]);
    assert_eq!(opened.pool, Some(pool_id("web")));
}
