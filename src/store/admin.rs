//! What a fleet shares besides pins: admin actions, in a hash every instance reads
//! (`PREFIX:admin`, one field per backend, a message on the channel of the same name when
//! one changes); the instances themselves, in a sorted set of when each was last seen
//! (`PREFIX:instances`); and the sessions each backend serves over the whole fleet, as
//! HyperLogLogs of the sessions seen coming back, one per backend and minute
//! (`PREFIX:seen:POOL:BACKEND:MINUTE`). The admin values are opaque here: `fleet` (the
//! control layer) writes and reads them.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use aes::cipher::BlockCipherEncrypt;
use redis::Value;

use super::{lock, Fleet, CONTROL_TIMEOUT, SHARDS};
use crate::backend::Backend;

/// Sessions waiting for the next flush, per shard at most; more are left for their next
/// request (a session that comes back once will come back again).
const MAX_SEEN: usize = 100_000 / SHARDS;
/// The longest window sessions are counted over: an hour of minute buckets.
pub const MAX_WINDOW_MINUTES: u64 = 60;

/// One backend's sessions seen coming back since the last flush.
#[derive(Debug)]
pub(super) struct Seen {
    pool: String,
    backend: String,
    /// Minutes a bucket is kept (the window the pool counts sessions over).
    window_minutes: u64,
    /// The sessions' ids, encrypted (Redis never sees one).
    ids: HashSet<u128>,
}

/// An instance not seen for this long is dropped from the set.
pub const INSTANCE_TTL: Duration = Duration::from_secs(30);

/// An instance of the fleet as Redis last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Its id (16 hex digits), the host it runs on and its process id.
    pub id: String,
    pub host: String,
    pub pid: u32,
    /// Unix milliseconds of its last heartbeat.
    pub seen_ms: u64,
}

impl Fleet {
    /// This process's id in the fleet (16 hex digits).
    pub fn instance_id(&self) -> String {
        format!("{:016x}", self.instance)
    }

    pub(super) fn admin_channel(&self) -> String {
        format!("{}:admin", self.cfg.prefix)
    }

    /// Wakes whoever keeps this instance's admin state in step with the fleet's: another
    /// instance changed it, or Redis came (back) and may hold changes this one missed.
    pub fn admin_changes(&self) -> &tokio::sync::Notify {
        &self.admin_changed
    }

    /// Sets `field` of the fleet's admin hash to `value` and tells the other instances.
    pub async fn admin_set(&self, field: &str, value: &str) -> Result<(), String> {
        let conn = self.conn.load_full().ok_or("Redis is down")?;
        let mut pipe = redis::pipe();
        pipe.cmd("HSET").arg(self.admin_channel()).arg(field).arg(value).ignore();
        pipe.cmd("PUBLISH").arg(self.admin_channel()).arg(self.instance_id()).ignore();
        let mut conn = (*conn).clone();
        match tokio::time::timeout(CONTROL_TIMEOUT, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("Redis did not answer within {CONTROL_TIMEOUT:?}")),
        }
    }

    /// The fleet's admin hash, field by field.
    pub async fn admin_all(&self) -> Result<Vec<(String, String)>, String> {
        let conn = self.conn.load_full().ok_or("Redis is down")?;
        let mut conn = (*conn).clone();
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.admin_channel());
        let read = cmd.query_async::<Vec<(String, String)>>(&mut conn);
        match tokio::time::timeout(CONTROL_TIMEOUT, read).await {
            Ok(Ok(fields)) => Ok(fields),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("Redis did not answer within {CONTROL_TIMEOUT:?}")),
        }
    }

    /// Notes this instance as seen now, and forgets instances not seen for
    /// [`INSTANCE_TTL`]. Part of the health check, once a second.
    pub(super) async fn heartbeat(&self, conn: &mut redis::aio::MultiplexedConnection) {
        let now = crate::time::unix_millis();
        let key = format!("{}:instances", self.cfg.prefix);
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD").arg(&key).arg(now).arg(&self.member).ignore();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(now.saturating_sub(INSTANCE_TTL.as_millis() as u64))
            .ignore();
        if tokio::time::timeout(CONTROL_TIMEOUT, pipe.query_async::<()>(conn)).await.is_err() {
            self.stats.timeouts.fetch_add(1, Relaxed);
        }
    }

    /// The instances seen within [`INSTANCE_TTL`], most recently seen first.
    pub async fn instances(&self) -> Result<Vec<Instance>, String> {
        let conn = self.conn.load_full().ok_or("Redis is down")?;
        let mut conn = (*conn).clone();
        let since = crate::time::unix_millis().saturating_sub(INSTANCE_TTL.as_millis() as u64);
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(format!("{}:instances", self.cfg.prefix))
            .arg("+inf")
            .arg(since)
            .arg("BYSCORE")
            .arg("REV")
            .arg("WITHSCORES");
        let read = cmd.query_async::<Vec<Value>>(&mut conn);
        let values = match tokio::time::timeout(CONTROL_TIMEOUT, read).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("Redis did not answer within {CONTROL_TIMEOUT:?}")),
        };
        Ok(instances_of(values))
    }
}

impl Fleet {
    /// A session of `backend` came back with its key (`id`, its 16-byte identity): it
    /// counts toward the backend's sessions over the fleet, within `window`. One-shot
    /// clients never come back, so they count nowhere.
    pub fn seen(&self, backend: &Backend, id: [u8; 16], window: Duration) {
        let mut block = id.into();
        self.cipher.encrypt_block(&mut block);
        let id = u128::from_le_bytes(block.into());
        let backend_id = crate::affinity::hash::backend_id(&backend.pool, &backend.name);
        let mut s = self.shard(id);
        let shard_len: usize = s.seen.values().map(|b| b.ids.len()).sum();
        if shard_len >= MAX_SEEN {
            return;
        }
        let entry = s.seen.entry(backend_id).or_insert_with(|| Seen {
            pool: backend.pool.clone(),
            backend: backend.name.clone(),
            window_minutes: window_minutes(window),
            ids: HashSet::new(),
        });
        entry.ids.insert(id);
    }

    fn seen_key(&self, pool: &str, backend: &str, minute: u64) -> String {
        format!("{}:seen:{pool}:{backend}:{minute}", self.cfg.prefix)
    }

    /// Sends the sessions seen since the last flush: one `PFADD` per backend into the
    /// bucket of this minute, kept for the pool's window.
    pub(super) async fn flush_seen(&self, conn: &redis::aio::MultiplexedConnection) {
        let mut all: Vec<Seen> = Vec::new();
        for s in &self.shards {
            let mut s = lock(s);
            for (_, seen) in s.seen.drain() {
                match all.iter_mut().find(|a| a.pool == seen.pool && a.backend == seen.backend) {
                    Some(a) => a.ids.extend(seen.ids),
                    None => all.push(seen),
                }
            }
        }
        if all.is_empty() {
            return;
        }
        let minute = crate::time::unix_millis() / 60_000;
        let mut pipe = redis::pipe();
        for seen in &all {
            let key = self.seen_key(&seen.pool, &seen.backend, minute);
            let mut pfadd = redis::cmd("PFADD");
            pfadd.arg(&key);
            for id in &seen.ids {
                pfadd.arg(&id.to_le_bytes()[..]);
            }
            pipe.add_command(pfadd).ignore();
            pipe.cmd("EXPIRE").arg(&key).arg((seen.window_minutes + 1) * 60).ignore();
        }
        self.stats.operations.fetch_add(2 * all.len() as u64, Relaxed);
        let mut conn = conn.clone();
        if !matches!(tokio::time::timeout(CONTROL_TIMEOUT, pipe.query_async::<()>(&mut conn)).await, Ok(Ok(()))) {
            // Lost: the sessions count again when they next come back.
            self.failed(false);
        }
    }

    /// The distinct sessions each of `backends` (pool, backend) served over the whole
    /// fleet within `window` (at most an hour): the union of its minute buckets.
    pub async fn fleet_sessions(&self, backends: &[(String, String)], window: Duration) -> Result<Vec<u64>, String> {
        if backends.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.conn.load_full().ok_or("Redis is down")?;
        let now = crate::time::unix_millis() / 60_000;
        let minutes = window_minutes(window);
        let mut pipe = redis::pipe();
        for (pool, backend) in backends {
            let mut count = redis::cmd("PFCOUNT");
            for m in now.saturating_sub(minutes)..=now {
                count.arg(self.seen_key(pool, backend, m));
            }
            pipe.add_command(count);
        }
        let mut conn = (*conn).clone();
        match tokio::time::timeout(CONTROL_TIMEOUT, pipe.query_async::<Vec<u64>>(&mut conn)).await {
            Ok(Ok(counts)) => Ok(counts),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("Redis did not answer within {CONTROL_TIMEOUT:?}")),
        }
    }
}

/// Whole minutes of `window`, at least one and at most [`MAX_WINDOW_MINUTES`].
fn window_minutes(window: Duration) -> u64 {
    window.as_secs().div_ceil(60).clamp(1, MAX_WINDOW_MINUTES)
}

/// The label an instance is listed under: `ID HOST PID`.
pub(super) fn member(instance: u64) -> String {
    format!("{instance:016x} {} {}", hostname(), std::process::id())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writes of its length; gethostname writes at most that
    // many bytes.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).replace(' ', "_");
    if ok && !name.is_empty() {
        name
    } else {
        "-".into()
    }
}

/// Reads a `ZRANGE ... WITHSCORES` reply (RESP2: member, score, member, score, ...;
/// RESP3: pairs) as instances; what does not parse is skipped.
fn instances_of(values: Vec<Value>) -> Vec<Instance> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Double(d) => Some(d.to_string()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    };
    let mut flat = Vec::new();
    for v in &values {
        match v {
            Value::Array(pair) => flat.extend(pair.iter().filter_map(text)),
            v => flat.extend(text(v)),
        }
    }
    flat.chunks_exact(2)
        .filter_map(|pair| {
            let mut words = pair[0].split(' ');
            let (id, host, pid) = (words.next()?, words.next()?, words.next()?.parse().ok()?);
            let seen_ms = pair[1].parse::<f64>().ok()? as u64;
            Some(Instance { id: id.to_string(), host: host.to_string(), pid, seen_ms })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_replies_are_read_in_both_protocols() {
        let resp2 = vec![
            Value::BulkString(b"00000000000000ab web-1 42".to_vec()),
            Value::BulkString(b"1700000000123".to_vec()),
            Value::BulkString(b"garbage".to_vec()),
            Value::BulkString(b"1".to_vec()),
        ];
        let want =
            Instance { id: "00000000000000ab".into(), host: "web-1".into(), pid: 42, seen_ms: 1_700_000_000_123 };
        assert_eq!(instances_of(resp2), vec![want.clone()]);
        let resp3 = vec![Value::Array(vec![
            Value::BulkString(b"00000000000000ab web-1 42".to_vec()),
            Value::Double(1_700_000_000_123.0),
        ])];
        assert_eq!(instances_of(resp3), vec![want]);
    }
}
