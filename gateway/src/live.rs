//! The settings a SIGHUP reloads without a restart: the static routes (`--route`, the routes
//! file), `--allow-upstream`, `--allow-origin` and the handshake settings that go with them.
//! (Certificates reload through [`crate::tls::Certs`], the log filter through the binary's
//! logging handle.)
//!
//! One [`Live`] is shared by every worker. A reload publishes a new [`Dynamic`] and bumps the
//! generation; each worker compares the generation (one atomic load) when it takes a
//! connection and at every housekeeping tick, and only then takes the new snapshot and
//! applies the route differences to its live sessions (a route that is gone closes its
//! sessions with 4006, a rewritten one moves their expiry), as Redis route events do. So the
//! workers share no lock on the hot path, and an idle worker follows within one tick.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use vncgate_ws::handshake::HandshakeConfig;

use crate::config::Settings;
use crate::policy::UpstreamPolicy;
use crate::route::{RouteChange, StaticRoutes};

/// One consistent set of the reloadable settings.
#[derive(Debug, Clone)]
pub struct Dynamic {
    pub handshake: HandshakeConfig,
    pub policy: UpstreamPolicy,
    pub routes: StaticRoutes,
}

impl Dynamic {
    pub fn of(s: &Settings) -> Dynamic {
        Dynamic {
            handshake: s.handshake.clone(),
            policy: s.policy.clone(),
            routes: s.routes.clone(),
        }
    }

    /// What live sessions must follow when `self` is replaced by `new`.
    pub fn route_changes(&self, new: &Dynamic) -> Vec<RouteChange> {
        let mut out = Vec::new();
        for (id, r) in self.routes.iter() {
            match new.routes.get(id) {
                None => out.push(RouteChange::Removed {
                    session: id.clone(),
                    expired: false,
                }),
                Some(n) if n != r => out.push(RouteChange::Changed {
                    session: id.clone(),
                }),
                Some(_) => {}
            }
        }
        out
    }
}

#[derive(Debug)]
pub struct Live {
    generation: AtomicU64,
    current: RwLock<Arc<Dynamic>>,
}

impl Live {
    pub fn new(d: Dynamic) -> Live {
        Live {
            generation: AtomicU64::new(0),
            current: RwLock::new(Arc::new(d)),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The snapshot and its generation, read together.
    pub fn current(&self) -> (u64, Arc<Dynamic>) {
        let d = self.current.read().unwrap_or_else(|p| p.into_inner());
        (self.generation(), d.clone())
    }

    /// Serves `d` from now on.
    pub fn publish(&self, d: Dynamic) {
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        *cur = Arc::new(d);
        // Bumped under the lock: a reader that sees the new generation gets the new value.
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Route;
    use std::collections::HashMap;

    fn routes(list: &[(&str, u16)]) -> StaticRoutes {
        StaticRoutes::new(
            list.iter()
                .map(|(id, port)| {
                    (
                        (*id).to_owned(),
                        Route {
                            upstream: format!("127.0.0.1:{port}").parse().unwrap(),
                            token_digest: None,
                            view_token_digest: None,
                            expires_at: None,
                            max_viewers: None,
                            record: false,
                        },
                    )
                })
                .collect::<HashMap<_, _>>(),
        )
    }

    fn dynamic(r: StaticRoutes) -> Dynamic {
        Dynamic {
            handshake: HandshakeConfig::default(),
            policy: UpstreamPolicy::new(Vec::new()),
            routes: r,
        }
    }

    #[test]
    fn removed_and_rewritten_routes_are_changes_added_ones_are_not() {
        let old = dynamic(routes(&[("a", 1), ("b", 2), ("c", 3)]));
        let new = dynamic(routes(&[("a", 1), ("b", 9), ("d", 4)]));
        let mut ch = old.route_changes(&new);
        ch.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(
            ch,
            vec![
                RouteChange::Changed {
                    session: "b".into()
                },
                RouteChange::Removed {
                    session: "c".into(),
                    expired: false
                },
            ]
        );
        let live = Live::new(old);
        assert_eq!(live.generation(), 0);
        live.publish(new);
        let (g, d) = live.current();
        assert_eq!(g, 1);
        assert!(d.routes.get("d").is_some());
    }
}
