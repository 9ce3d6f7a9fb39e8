//! `vncgate route add|del|list`: route management in Redis for deployments without the
//! controller. Writes go through the shared schema ([`vncgate_schema::store`]), so gateways
//! see them as they see the controller's: an event per write, revocation on delete.

use std::time::Duration;

use vncgate_schema::store::{self, Conn};
use vncgate_schema::{RedisUrl, RemovalReason, RouteRecord, record};

use crate::config::{DelReason, RedisArg, RouteAddArgs, RouteCommand, RouteDelArgs, RouteListArgs};
use crate::policy::{UpstreamPolicy, parse_cidr};
use crate::route;
use crate::token::parse_digest_hex;

/// What a command ended with: done, or done but the thing was not there (exit status 1).
pub enum Outcome {
    Done,
    NotFound,
}

pub fn run(cmd: &RouteCommand) -> Result<Outcome, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    match cmd {
        RouteCommand::Add(a) => {
            let rec = record_from_args(a)?;
            rt.block_on(async {
                let mut c = connect(&a.redis).await?;
                store::put_route(&mut c, &a.session, &rec)
                    .await
                    .map_err(|e| format!("cannot write the route: {e}"))
            })?;
            println!(
                "route {} -> {} written{}",
                a.session,
                rec.upstream,
                describe(&rec)
            );
            Ok(Outcome::Done)
        }
        RouteCommand::Del(d) => del(&rt, d),
        RouteCommand::List(l) => list(&rt, l),
    }
}

async fn connect(arg: &RedisArg) -> Result<Conn, String> {
    let url: RedisUrl = arg.redis.parse().map_err(|e| format!("--redis: {e}"))?;
    url.connect_for_command().await
}

/// Validates the flags into a record, before Redis is contacted.
fn record_from_args(a: &RouteAddArgs) -> Result<RouteRecord, String> {
    vncgate_schema::check_session_id(&a.session).map_err(|e| format!("--session: {e}"))?;
    let upstream = route::resolve(&a.upstream).map_err(|e| format!("--upstream: {e}"))?;
    record::check_upstream(&upstream).map_err(|e| format!("--upstream: {e}"))?;
    let mut cidrs = a.allow_upstream.clone();
    if let Some(p) = &a.config {
        cidrs.extend(crate::config::file::read(p)?.allow_upstream);
    }
    let nets = cidrs
        .iter()
        .filter(|c| !c.trim().is_empty())
        .map(|c| parse_cidr(c.trim()).map_err(|e| format!("--allow-upstream: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if nets.is_empty() {
        eprintln!(
            "vncgate: warning: no --allow-upstream given; {upstream} is not checked (gateways dial only inside their own --allow-upstream)"
        );
    } else if !UpstreamPolicy::new(nets.clone()).allows(&upstream) {
        let list: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
        return Err(format!(
            "--upstream: {upstream} is outside the allowed CIDRs ({}); gateways would refuse to dial it",
            list.join(", ")
        ));
    }
    let token_sha256 = match (&a.token, &a.token_sha256) {
        (Some(t), _) => {
            Some(record::checked_token_digest(t.as_bytes()).map_err(|e| format!("--token: {e}"))?)
        }
        (None, Some(h)) => Some(parse_digest_hex(h).map_err(|e| format!("--token-sha256: {e}"))?),
        (None, None) => None,
    };
    let view_token_sha256 = match (&a.view_token, &a.view_token_sha256) {
        (Some(t), _) => Some(
            record::checked_token_digest(t.as_bytes()).map_err(|e| format!("--view-token: {e}"))?,
        ),
        (None, Some(h)) => {
            Some(parse_digest_hex(h).map_err(|e| format!("--view-token-sha256: {e}"))?)
        }
        (None, None) => None,
    };
    record::check_view_token(token_sha256.as_ref(), view_token_sha256.as_ref())
        .map_err(|e| format!("--view-token: {e}"))?;
    let expires_at = match a.ttl {
        None => None,
        Some(d) if d < Duration::from_secs(1) => {
            return Err("--ttl must be at least 1 second".into());
        }
        Some(d) => Some(record::expires_after(d)),
    };
    let now = vncgate_schema::unix_now();
    Ok(RouteRecord {
        upstream,
        token_sha256,
        view_token_sha256,
        expires_at,
        max_viewers: a.max_viewers,
        created_at: now,
        writer: Some("vncgate route add".into()),
        record: a.record,
    })
}

fn describe(r: &RouteRecord) -> String {
    let mut s = String::new();
    if r.token_sha256.is_some() {
        s.push_str(", token required");
    }
    if r.view_token_sha256.is_some() {
        s.push_str(", view-only token");
    }
    if let Some(at) = r.expires_at {
        s.push_str(&format!(
            ", expires in {} s",
            at.saturating_sub(vncgate_schema::unix_now())
        ));
    }
    match r.max_viewers {
        Some(0) => s.push_str(", unlimited viewers"),
        Some(n) => s.push_str(&format!(", at most {n} viewers")),
        None => {}
    }
    s
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn del(rt: &tokio::runtime::Runtime, d: &RouteDelArgs) -> Result<Outcome, String> {
    vncgate_schema::check_session_id(&d.session).map_err(|e| format!("--session: {e}"))?;
    let reason = match d.reason {
        DelReason::Revoked => RemovalReason::Revoked,
        DelReason::Expired => RemovalReason::Expired,
    };
    let existed = rt.block_on(async {
        let mut c = connect(&d.redis).await?;
        store::delete_route(&mut c, &d.session, reason)
            .await
            .map_err(|e| format!("cannot delete the route: {e}"))
    })?;
    if existed {
        println!("route {} deleted; gateways close its sessions", d.session);
        Ok(Outcome::Done)
    } else {
        eprintln!(
            "vncgate: no route for session '{}' (the removal was announced anyway)",
            d.session
        );
        Ok(Outcome::NotFound)
    }
}

fn list(rt: &tokio::runtime::Runtime, l: &RouteListArgs) -> Result<Outcome, String> {
    let routes = rt.block_on(async {
        let mut c = connect(&l.redis).await?;
        store::list_routes(&mut c)
            .await
            .map_err(|e| format!("cannot list routes: {e}"))
    })?;
    let now = vncgate_schema::unix_now();
    if l.json {
        for (id, r) in &routes {
            let v = match r {
                Ok(r) => serde_json::json!({
                    "session": id,
                    "upstream": r.upstream.to_string(),
                    "token": r.token_sha256.is_some(),
                    "view_token": r.view_token_sha256.is_some(),
                    "expires_at": r.expires_at,
                    "expired": r.expires_at.is_some_and(|t| t <= now),
                    "max_viewers": r.max_viewers,
                    "created_at": r.created_at,
                    "writer": r.writer,
                }),
                Err(e) => serde_json::json!({"session": id, "error": e.to_string()}),
            };
            println!("{v}");
        }
        return Ok(Outcome::Done);
    }
    println!(
        "{:<24} {:<22} {:<6} {:<5} {:<14} {:<11} WRITER",
        "SESSION", "UPSTREAM", "TOKEN", "VIEW", "EXPIRES", "MAX_VIEWERS"
    );
    for (id, r) in &routes {
        match r {
            Ok(r) => {
                let expires = match r.expires_at {
                    None => "never".to_string(),
                    Some(t) if t <= now => "expired".to_string(),
                    Some(t) => format!("in {} s", t - now),
                };
                let viewers = match r.max_viewers {
                    None => "default".to_string(),
                    Some(0) => "unlimited".to_string(),
                    Some(n) => n.to_string(),
                };
                println!(
                    "{:<24} {:<22} {:<6} {:<5} {:<14} {:<11} {}",
                    id,
                    r.upstream,
                    yes_no(r.token_sha256.is_some()),
                    yes_no(r.view_token_sha256.is_some()),
                    expires,
                    viewers,
                    r.writer.as_deref().unwrap_or("-")
                );
            }
            Err(e) => println!("{id:<24} unusable record: {e}"),
        }
    }
    println!("{} route(s)", routes.len());
    Ok(Outcome::Done)
}
