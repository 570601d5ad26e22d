//! Why a session was refused. The peer never learns which: every refusal looks the same from
//! outside (exit 126, one fixed stderr line, nothing on stdout, at least [`crate::MIN_REFUSAL`]
//! after start); the reason code and detail go only to the auth log.

/// A refusal reason; `code()` is what the auth log shows as `reason=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// Not started as root on all three uids (a deployment error).
    NotRoot,
    /// fds 0-2, close_range, umask, rlimit, dumpable or signal setup failed.
    Setup,
    /// Bad `command=` arguments (a deployment error).
    BadArguments,
    /// The environment carried a loader or shell variable (LD_*, GLIBC_TUNABLES, …).
    PoisonedEnv,
    /// The policy file (or a directory above it) could be changed by someone other than root.
    PolicyUntrusted,
    /// The policy file is not valid.
    PolicyInvalid,
    /// The policy has no rule for this peer.
    NoPeerRule,
    /// The username line did not arrive before the deadline.
    ReadTimeout,
    /// The username line is longer than the cap.
    LineTooLong,
    /// End of input before the LF.
    EofBeforeNewline,
    /// Reading fd 0 failed.
    ReadError,
    /// The name does not match the grammar.
    BadName,
    /// The user database could not be read (or is not root's).
    LookupFailed,
    /// No such user.
    NoSuchUser,
    /// The database returned a different name than asked for (case-insensitive NSS, aliases).
    NameMismatch,
    /// uid 0, -1 or 0xFFFF.
    ForbiddenUid,
    /// gid 0, -1 or 0xFFFF.
    ForbiddenGid,
    /// uid outside first_valid_uid..=last_valid_uid.
    UidOutOfRange,
    /// Primary gid outside first_valid_gid..=last_valid_gid.
    GidOutOfRange,
    /// The user exists but this peer may not replicate it.
    NotAllowed,
    /// An extra group in the policy cannot be used.
    BadGroup,
    /// The home directory in the userdb is unusable (empty, relative, not UTF-8).
    BadHome,
    /// The lock directory or lock file is not root's, or could not be made.
    LockSetup,
    /// The drop itself failed.
    DropFailed,
    /// The drop could not be proven (ids, caps, or root regained).
    DropNotVerified,
    /// The home is a symlink.
    HomeSymlink,
    /// The home could not be opened (missing, not a directory, no permission).
    HomeOpen,
    /// The home is not owned by the user.
    HomeOwner,
    /// The home is writable by group or others.
    HomeMode,
    /// Another session of this user still runs after the wait.
    LockBusy,
    /// `mail_location` does not expand for this user.
    MailLocation,
}

impl Reason {
    /// The stable code written to the auth log.
    pub(crate) fn code(self) -> &'static str {
        match self {
            Self::NotRoot => "not-root",
            Self::Setup => "setup-failed",
            Self::BadArguments => "bad-arguments",
            Self::PoisonedEnv => "poisoned-env",
            Self::PolicyUntrusted => "policy-untrusted",
            Self::PolicyInvalid => "policy-invalid",
            Self::NoPeerRule => "no-peer-rule",
            Self::ReadTimeout => "read-timeout",
            Self::LineTooLong => "line-too-long",
            Self::EofBeforeNewline => "eof-before-newline",
            Self::ReadError => "read-error",
            Self::BadName => "bad-name",
            Self::LookupFailed => "lookup-failed",
            Self::NoSuchUser => "no-such-user",
            Self::NameMismatch => "name-mismatch",
            Self::ForbiddenUid => "forbidden-uid",
            Self::ForbiddenGid => "forbidden-gid",
            Self::UidOutOfRange => "uid-out-of-range",
            Self::GidOutOfRange => "gid-out-of-range",
            Self::NotAllowed => "not-allowed",
            Self::BadGroup => "bad-group",
            Self::BadHome => "bad-home",
            Self::LockSetup => "lock-setup",
            Self::DropFailed => "drop-failed",
            Self::DropNotVerified => "drop-not-verified",
            Self::HomeSymlink => "home-symlink",
            Self::HomeOpen => "home-open",
            Self::HomeOwner => "home-owner",
            Self::HomeMode => "home-mode",
            Self::LockBusy => "lock-busy",
            Self::MailLocation => "mail-location",
        }
    }
}

/// A refusal: the reason and a detail for the auth log (already free of peer bytes, or escaped).
#[derive(Debug)]
pub(crate) struct Refusal {
    /// Why.
    pub(crate) reason: Reason,
    /// Details for the admin.
    pub(crate) detail: String,
}

impl Refusal {
    /// A refusal with a detail.
    pub(crate) fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self { reason, detail: detail.into() }
    }
}
