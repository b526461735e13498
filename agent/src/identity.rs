//! Who is calling: established by the socket, never by a field the client
//! fills in. On the Unix sockets the kernel's `SO_PEERCRED` (uid, gid, pid
//! at connect); on TCP one anonymous local identity (`tcp`) that owns what
//! it creates. Every payload records its creator; only the creator (and
//! the agent's own uid) may change it, and reads follow `--read-access`.

use std::fmt;

use payload_catalog::PayloadRecord;

use crate::error::AgentError;

/// A caller as its connection identifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    Unix {
        uid: u32,
        gid: u32,
        pid: i32,
    },
    /// Tokenless loopback TCP, or TCP with the node's token: one identity.
    Tcp,
}

/// Who may read (lease) a payload besides its owner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadAccess {
    /// Its owner only.
    #[default]
    Owner,
    /// Callers in the owner's group too.
    Group,
    /// Every caller that can reach the agent on this node.
    Node,
}

impl ReadAccess {
    /// The mode of the agent's sockets: who may connect at all.
    pub fn socket_mode(self) -> u32 {
        match self {
            ReadAccess::Owner => 0o600,
            ReadAccess::Group => 0o660,
            ReadAccess::Node => 0o666,
        }
    }

    /// The mode of a named region once sealed (v1 readers open it by name).
    pub fn region_mode(self) -> u32 {
        match self {
            ReadAccess::Owner => 0o400,
            ReadAccess::Group => 0o440,
            ReadAccess::Node => 0o444,
        }
    }

    fn flag(self) -> &'static str {
        match self {
            ReadAccess::Owner => "owner",
            ReadAccess::Group => "group",
            ReadAccess::Node => "node",
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Unix { uid, gid, .. } => write!(f, "unix:{uid}:{gid}"),
            Caller::Tcp => f.write_str("tcp"),
        }
    }
}

fn owner_uid(owner: &str) -> Option<u32> {
    owner.strip_prefix("unix:")?.split(':').next()?.parse().ok()
}

fn agent_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

impl Caller {
    /// The caller as a payload records it.
    pub fn principal(&self) -> String {
        self.to_string()
    }

    pub fn is_agent(&self) -> bool {
        matches!(self, Caller::Unix { uid, .. } if *uid == agent_uid())
    }

    /// Ownership is the user's: the same uid under another group (`sg`,
    /// a setgid program) still owns what it made.
    fn owns(&self, owner: &str) -> bool {
        match self {
            Caller::Unix { uid, .. } => owner_uid(owner) == Some(*uid),
            Caller::Tcp => owner == "tcp",
        }
    }

    fn in_group_of(&self, owner: &str) -> bool {
        let owner_gid = owner.strip_prefix("unix:").and_then(|rest| rest.split(':').nth(1));
        match (self, owner_gid) {
            (Caller::Unix { gid, .. }, Some(owner_gid)) => owner_gid == gid.to_string(),
            _ => false,
        }
    }

    /// Whether this caller may change `rec` (commit, abort, delete, pin,
    /// spill, promote, metadata): its owner, or the agent's own uid.
    pub fn may_change(&self, rec: &PayloadRecord, what: &str) -> Result<(), AgentError> {
        self.may_change_owned(rec.owner.as_deref(), format_args!("{what} payload {}", rec.id))
    }

    /// [`Caller::may_change`] of anything with an owner (a stream too);
    /// `what` says what was asked ("deleting stream ns/s").
    pub fn may_change_owned(&self, owner: Option<&str>, what: fmt::Arguments<'_>) -> Result<(), AgentError> {
        match owner {
            Some(owner) if !self.owns(owner) && !self.is_agent() => Err(AgentError::PermissionDenied(format!(
                "{what} is for its owner ({owner}) only, and this caller is {self}: only the owner and the \
                 agent's own user may change it"
            ))),
            _ => Ok(()),
        }
    }

    /// Whether this caller may read `rec` under `rule`.
    pub fn may_read(&self, rec: &PayloadRecord, rule: ReadAccess) -> Result<(), AgentError> {
        self.may_read_owned(rec.owner.as_deref(), rule, format_args!("reading payload {}", rec.id))
    }

    /// [`Caller::may_read`] of anything with an owner.
    pub fn may_read_owned(
        &self,
        owner: Option<&str>,
        rule: ReadAccess,
        what: fmt::Arguments<'_>,
    ) -> Result<(), AgentError> {
        let Some(owner) = owner else { return Ok(()) };
        let allowed = self.owns(owner)
            || self.is_agent()
            || rule == ReadAccess::Node
            || (rule == ReadAccess::Group && self.in_group_of(owner));
        if allowed {
            return Ok(());
        }
        Err(AgentError::PermissionDenied(format!(
            "{what} is refused by the read rule --read-access {} (owner {owner}, caller {self}); ask the \
             node's operator for --read-access group or node",
            rule.flag()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use payload_catalog::{PayloadId, Tier};

    fn owned_by(owner: &str) -> PayloadRecord {
        PayloadRecord {
            owner: Some(owner.into()),
            ..PayloadRecord::allocated(PayloadId::random(), Tier::Ram, 1, 0)
        }
    }

    #[test]
    fn owners_change_their_payloads_and_others_do_not() {
        let stranger = Caller::Unix {
            uid: agent_uid().wrapping_add(1),
            gid: 4242,
            pid: 1,
        };
        let rec = owned_by("unix:99999:4242");
        assert!(stranger.may_change(&rec, "deleting").is_err());
        assert!(Caller::Unix {
            uid: 99999,
            gid: 4242,
            pid: 2
        }
        .may_change(&rec, "deleting")
        .is_ok());
        let regrouped = Caller::Unix {
            uid: 99999,
            gid: 1,
            pid: 2,
        };
        assert!(
            regrouped.may_change(&rec, "deleting").is_ok(),
            "the same user under another group"
        );
        assert!(Caller::Unix {
            uid: agent_uid(),
            gid: 0,
            pid: 3
        }
        .may_change(&rec, "deleting")
        .is_ok());
        assert!(Caller::Tcp.may_change(&rec, "deleting").is_err());
        let legacy = PayloadRecord {
            owner: None,
            ..rec.clone()
        };
        assert!(
            stranger.may_change(&legacy, "deleting").is_ok(),
            "rows from before owners stay open"
        );
    }

    #[test]
    fn reads_follow_the_rule() {
        let rec = owned_by("unix:99999:4242");
        let same_group = Caller::Unix {
            uid: 99998,
            gid: 4242,
            pid: 1,
        };
        let other = Caller::Unix {
            uid: 99997,
            gid: 7,
            pid: 1,
        };
        assert!(same_group.may_read(&rec, ReadAccess::Owner).is_err());
        assert!(same_group.may_read(&rec, ReadAccess::Group).is_ok());
        assert!(other.may_read(&rec, ReadAccess::Group).is_err());
        assert!(other.may_read(&rec, ReadAccess::Node).is_ok());
        let err = other.may_read(&rec, ReadAccess::Owner).unwrap_err().to_string();
        assert!(err.contains("--read-access owner"), "{err}");
    }
}
