//! View-only viewers (the route's view token): the browser's RFB stream goes through
//! [`vncgate_rfb::ViewOnlyFilter`] on its way to the VM, which forces ClientInit's shared
//! flag and drops every message that acts (keys, pointer, clipboard, desktop size, power,
//! QEMU's extended keys), counted by kind. What the filter cannot follow (a security type
//! other than None and VNC auth, an RFB version other than 3.7 and 3.8, a message it cannot
//! size) closes the viewer with its named code, and nothing of that read reaches the VM.
//!
//! The relay calls [`ViewOnly::filter`] in one place, on the unmasked payload of each read,
//! and only for view-only sessions: full viewers pay one branch. The filter works in place
//! and buffers nothing, so a view-only session holds no more memory than a full one.

use vncgate_rfb::{ViewOnlyError, ViewOnlyFilter};

use crate::close::{self, CloseCause};
use crate::metrics as m;

/// One view-only viewer's filter.
#[derive(Debug, Default)]
pub struct ViewOnly {
    filter: ViewOnlyFilter,
    /// Whether the viewer's request for an exclusive session was logged already.
    told_exclusive: bool,
}

impl ViewOnly {
    pub fn new() -> ViewOnly {
        ViewOnly::default()
    }

    /// Filters one read's payload in place; returns how much of the front of `buf` goes to
    /// the VM, or the cause to close with (counted and logged here with the session id).
    pub fn filter(&mut self, session: &str, buf: &mut [u8]) -> Result<usize, CloseCause> {
        let r = self.filter.filter(buf);
        for (kind, n) in self.filter.take_dropped() {
            metrics::counter!(m::VIEW_ONLY_DROPPED, "kind" => kind.name()).increment(n.into());
        }
        if !self.told_exclusive && self.filter.asked_exclusive() {
            self.told_exclusive = true;
            tracing::info!(
                session,
                "view-only viewer asked for an exclusive session; made shared"
            );
        }
        r.map_err(|e| {
            let cause = cause_of(&e);
            tracing::info!(
                session,
                code = cause.code,
                cause = cause.name,
                error = %e,
                "view-only viewer closed: its stream cannot be followed"
            );
            cause
        })
    }
}

/// The close for a stream the filter cannot follow.
pub fn cause_of(e: &ViewOnlyError) -> CloseCause {
    match e {
        ViewOnlyError::Version(_) => close::VIEW_ONLY_VERSION,
        ViewOnlyError::Security(_) => close::VIEW_ONLY_SECURITY,
        ViewOnlyError::Unsizable(_) => close::VIEW_ONLY_UNSIZABLE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_has_its_code() {
        let mut v = ViewOnly::new();
        let mut b = b"RFB 003.003\n".to_vec();
        assert_eq!(v.filter("s", &mut b), Err(close::VIEW_ONLY_VERSION));
        // And stays refused.
        assert_eq!(v.filter("s", &mut [1]), Err(close::VIEW_ONLY_VERSION));

        let mut b = b"RFB 003.008\n\x13".to_vec();
        assert_eq!(
            ViewOnly::new().filter("s", &mut b),
            Err(close::VIEW_ONLY_SECURITY)
        );

        let mut v = ViewOnly::new();
        let mut b = b"RFB 003.007\n\x01\x00".to_vec();
        assert_eq!(v.filter("s", &mut b), Ok(14));
        assert_eq!(b[13], 1, "shared forced");
        // A pointer event is dropped, an update request passes.
        let mut b = vec![5, 1, 0, 10, 0, 10, 3, 1, 0, 0, 0, 0, 0, 8, 0, 8];
        assert_eq!(v.filter("s", &mut b), Ok(10));
        assert_eq!(b[..10], [3, 1, 0, 0, 0, 0, 0, 8, 0, 8]);
        assert_eq!(v.filter("s", &mut [77]), Err(close::VIEW_ONLY_UNSIZABLE));
    }
}
