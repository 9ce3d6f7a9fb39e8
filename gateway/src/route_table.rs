//! A route table another component of the same process writes: the controller's embedded
//! default feeds the gateway through it, without Redis. Writes go to one table shared by all
//! workers and, as [`RouteChange`]s, to each worker's mailbox, whose bell wakes the worker
//! to apply them to its live sessions (a removal closes them with 4006 or 4005, a rewrite
//! moves their expiry), exactly as route events from Redis do.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::route::{Route, RouteChange, RouteSource, Unavailable};
use crate::server::mailbox::Mailbox;

#[derive(Debug)]
struct Inner {
    routes: RwLock<HashMap<String, Arc<Route>>>,
    workers: Vec<Mailbox<RouteChange>>,
}

/// The writing side, cheap to clone.
#[derive(Debug, Clone)]
pub struct RouteTable {
    inner: Arc<Inner>,
}

impl RouteTable {
    /// A table for a gateway of `workers` workers.
    pub fn new(workers: usize) -> std::io::Result<RouteTable> {
        Ok(RouteTable {
            inner: Arc::new(Inner {
                routes: RwLock::default(),
                workers: (0..workers)
                    .map(|_| Mailbox::new())
                    .collect::<Result<_, _>>()?,
            }),
        })
    }

    fn tell(&self, change: RouteChange) {
        for w in &self.inner.workers {
            w.post(change.clone());
        }
    }

    /// Writes (creates or replaces) a route; live sessions of a replaced one take up its
    /// new expiry.
    pub fn put(&self, session: &str, route: Route) {
        let had = self
            .inner
            .routes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(session.to_owned(), Arc::new(route))
            .is_some();
        if had {
            self.tell(RouteChange::Changed {
                session: session.to_owned(),
            });
        }
    }

    /// Removes a route; its live sessions close with 4005 (`expired`) or 4006.
    pub fn remove(&self, session: &str, expired: bool) {
        self.inner
            .routes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(session);
        self.tell(RouteChange::Removed {
            session: session.to_owned(),
            expired,
        });
    }

    /// Worker `index`'s reading side (`server::start_with`'s `make_routes`).
    pub fn source(&self, index: usize) -> TableRoutes {
        TableRoutes {
            table: self.clone(),
            index,
        }
    }
}

/// One worker's view of a [`RouteTable`].
pub struct TableRoutes {
    table: RouteTable,
    index: usize,
}

impl RouteSource for TableRoutes {
    async fn lookup(&self, session_id: &str) -> Result<Option<Arc<Route>>, Unavailable> {
        Ok(self
            .table
            .inner
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(session_id)
            .cloned())
    }

    fn changes(&self) -> Vec<RouteChange> {
        self.table.inner.workers[self.index].take_all()
    }

    fn bell(&self) -> Option<std::os::unix::net::UnixStream> {
        self.table.inner.workers[self.index].take_bell()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(port: u16) -> Route {
        Route {
            upstream: format!("127.0.0.1:{port}").parse().unwrap(),
            token_digest: None,
            view_token_digest: None,
            expires_at: None,
            max_viewers: None,
            record: false,
        }
    }

    #[test]
    fn writes_reach_every_worker_as_changes() {
        let t = RouteTable::new(2).unwrap();
        let (a, b) = (t.source(0), t.source(1));
        t.put("s", route(1));
        // A new route is no change to live sessions (there are none).
        assert!(a.changes().is_empty());
        t.put("s", route(2));
        t.remove("s", false);
        let want = vec![
            RouteChange::Changed {
                session: "s".into(),
            },
            RouteChange::Removed {
                session: "s".into(),
                expired: false,
            },
        ];
        assert_eq!(a.changes(), want);
        assert_eq!(b.changes(), want);
        assert!(a.changes().is_empty());
        assert!(
            a.bell().is_some() && a.bell().is_none(),
            "the bell is taken once"
        );
    }
}
