//! doveadm-style mail commands on the user's store.

use std::io::{self, Read, Write};

use anyhow::{Context, anyhow};

use super::output::{Cell, Column, Format, Printer};
use super::search::{Query, mailbox_match};
use super::{Failure, FlagsCommand, MailboxCommand, Session, exit};
use mailreplica::store::maildir::Maildir;
use mailreplica::store::{
    FlagOp, Flags, Guid128, Keyword, MailRecord, MailStore, Mailbox, MailboxInfo, MailboxKind, MailboxName, SaveRequest,
};
use mailreplica::userdb::wildcard_match;

fn parse_name(store: &Maildir, s: &str) -> Result<MailboxName, Failure> {
    Ok(MailboxName::parse(s, store.hierarchy_separator())?)
}

/// Selectable mailboxes named by `patterns` (`*` and `%` wildcards), INBOX first, then by
/// name. Literal names are opened directly rather than found by listing every mailbox, so
/// that a damaged mailbox elsewhere in the tree does not stop commands on this one. A single
/// literal name that does not exist is an error (doveadm's NOTFOUND exit code).
fn resolve(store: &mut Maildir, patterns: &[String], guids: &[Guid128]) -> Result<Vec<MailboxName>, Failure> {
    let sep = store.hierarchy_separator();
    let literal = !patterns.is_empty() && guids.is_empty() && !patterns.iter().any(|p| p.contains(['*', '%']));
    let mut v: Vec<MailboxName> = if literal {
        let mut names = Vec::new();
        for p in patterns {
            let name = parse_name(store, p)?;
            if store.mailbox_exists(&name)? && !names.contains(&name) {
                names.push(name);
            }
        }
        names
    } else {
        store
            .list()?
            .into_iter()
            .filter(|i| i.kind == MailboxKind::Mailbox)
            .filter(|i| patterns.is_empty() || patterns.iter().any(|p| mailbox_match(p, &i.name.join(sep), sep)))
            .filter(|i| guids.is_empty() || i.guid.is_some_and(|g| guids.contains(&g)))
            .map(|i| i.name)
            .collect()
    };
    if v.is_empty() && patterns.len() == 1 && !patterns[0].contains(['*', '%']) {
        return Err(Failure::new(exit::NOTFOUND, anyhow!("Mailbox doesn't exist: {}", patterns[0])));
    }
    v.sort_by(|a, b| (!a.is_inbox(), a).cmp(&(!b.is_inbox(), b)));
    Ok(v)
}

/// The mailboxes a search query selects.
fn selected(store: &mut Maildir, q: &Query) -> Result<Vec<MailboxName>, Failure> {
    resolve(store, &q.mailboxes, &q.mailbox_guids)
}

fn stdout_printer(format: Format, cols: Vec<Column>) -> Printer<io::BufWriter<io::StdoutLock<'static>>> {
    Printer::new(format, cols, io::BufWriter::with_capacity(256 * 1024, io::stdout().lock()))
}

fn flag_string(m: &MailRecord) -> String {
    let mut f = m.flags;
    if m.recent {
        f |= Flags::RECENT;
    }
    let mut parts: Vec<&str> = f.names().collect();
    parts.extend(m.keywords.iter().map(Keyword::as_str));
    parts.join(" ")
}

/// `fetch FIELDS SEARCH`
pub(super) fn fetch(s: &Session, format: Option<Format>, fields: &str, search: &[String]) -> Result<(), Failure> {
    const KNOWN: &[&str] = &[
        "uid",
        "guid",
        "flags",
        "modseq",
        "seq",
        "mailbox",
        "mailbox-guid",
        "size.physical",
        "size.virtual",
        "date.received",
        "date.saved",
        "text",
        "hdr",
        "body",
    ];
    let fields: Vec<&str> = fields.split_whitespace().collect();
    if fields.is_empty() {
        return Err(Failure::new(exit::USAGE, anyhow!("no fields given")));
    }
    if let Some(f) = fields.iter().find(|f| !KNOWN.contains(f)) {
        return Err(Failure::new(exit::USAGE, anyhow!("Unknown fetch field: {f}")));
    }
    let q = Query::parse(search).map_err(|e| Failure::new(exit::USAGE, e))?;
    let mut store = s.store()?;
    let sep = store.hierarchy_separator();
    let mut out = stdout_printer(format.unwrap_or(Format::Pager), fields.iter().map(|f| Column::new(*f)).collect());
    for name in selected(&mut store, &q)? {
        let mut mb = store.open(&name)?;
        let mailbox_guid = mb.status().guid;
        let mails = mb.mails();
        let count = mails.len() as u32;
        let max_uid = mails.last().map_or(0, |m| m.uid.get());
        for (i, m) in mails.iter().enumerate() {
            let seq = i as u32 + 1;
            if !q.matches(m, seq, count, max_uid) {
                continue;
            }
            let mut row = Vec::with_capacity(fields.len());
            for f in &fields {
                let cell = match *f {
                    "uid" => Cell::Text(m.uid.to_string()),
                    "guid" => Cell::Text(m.guid.to_string()),
                    "flags" => Cell::Text(flag_string(m)),
                    "modseq" => Cell::Text(m.modseq.to_string()),
                    "seq" => Cell::Text(seq.to_string()),
                    "mailbox" => Cell::Text(name.join(sep)),
                    "mailbox-guid" => Cell::Text(mailbox_guid.to_string()),
                    "size.physical" => Cell::Text(mb.physical_size(m.uid)?.to_string()),
                    "size.virtual" => Cell::Text(mb.virtual_size(m.uid)?.to_string()),
                    "date.received" => Cell::Text(mailreplica::sys::format_local_time(mb.received_date(m.uid)?)),
                    "date.saved" => Cell::Text(mailreplica::sys::format_local_time(mb.saved_date(m.uid)?)),
                    "text" | "hdr" | "body" => {
                        let mut data = Vec::new();
                        mb.open_body(m.uid)?
                            .read_to_end(&mut data)
                            .with_context(|| format!("reading UID {}", m.uid))?;
                        Cell::Stream(split_message(data, f))
                    }
                    _ => unreachable!("fields were checked above"),
                };
                row.push(cell);
            }
            out.row(&row)?;
        }
    }
    out.finish()?;
    Ok(())
}

/// Header (up to and including the empty line) or body of a message.
fn split_message(data: Vec<u8>, part: &str) -> Vec<u8> {
    if part == "text" {
        return data;
    }
    let end = data
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|p| p + 2)
        .or_else(|| data.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4))
        .unwrap_or(data.len());
    if part == "hdr" { data[..end].to_vec() } else { data[end..].to_vec() }
}

/// Parses a `flags` argument into system flags and keywords.
fn parse_flags(s: &str) -> Result<(Flags, Vec<Keyword>), Failure> {
    let mut flags = Flags::NONE;
    let mut kws = Vec::new();
    for t in s.split_whitespace() {
        if t.starts_with('\\') {
            match Flags::from_name(t) {
                Some(f) if f != Flags::RECENT => flags |= f,
                _ => {
                    return Err(Failure::new(exit::USAGE, anyhow!("Invalid system flag: {t}")));
                }
            }
        } else {
            // doveadm: "Invalid keywords" is NOTPOSSIBLE (65), unlike an invalid system flag.
            kws.push(Keyword::new(t).map_err(|e| Failure::new(exit::DATAERR, e.into()))?);
        }
    }
    Ok((flags, kws))
}

/// `flags add|remove|replace FLAGS SEARCH`
pub(super) fn flags(s: &Session, cmd: &FlagsCommand) -> Result<(), Failure> {
    let (op, flags, search) = match cmd {
        FlagsCommand::Add { flags, search } => (FlagOp::Add, flags, search),
        FlagsCommand::Remove { flags, search } => (FlagOp::Remove, flags, search),
        FlagsCommand::Replace { flags, search } => (FlagOp::Replace, flags, search),
    };
    let (f, kws) = parse_flags(flags)?;
    if op != FlagOp::Replace && f.is_empty() && kws.is_empty() {
        return Err(Failure::new(exit::USAGE, anyhow!("no flags given")));
    }
    let q = Query::parse(search).map_err(|e| Failure::new(exit::USAGE, e))?;
    let mut store = s.store()?;
    for name in selected(&mut store, &q)? {
        let mut mb = store.open(&name)?;
        let mails = mb.mails();
        let count = mails.len() as u32;
        let max_uid = mails.last().map_or(0, |m| m.uid.get());
        for (i, m) in mails.iter().enumerate() {
            if q.matches(m, i as u32 + 1, count, max_uid) {
                match mb.change_flags(m.uid, op, f, &kws, 0) {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {} // expunged meanwhile
                    Err(e) => return Err(e.into()),
                }
            }
        }
        mb.sync_point()?;
    }
    Ok(())
}

/// `expunge SEARCH`
pub(super) fn expunge(s: &Session, search: &[String]) -> Result<(), Failure> {
    let q = Query::parse(search).map_err(|e| Failure::new(exit::USAGE, e))?;
    if !q.has_conditions() {
        // doveadm's safety net, word for word: `expunge mailbox INBOX` must not empty INBOX.
        return Err(Failure::new(
            exit::USAGE,
            anyhow!(
                "expunge: To avoid accidents, each branch in search query must contain something else \
                 besides MAILBOX (e.g. just add \"all\" if you want everything)"
            ),
        ));
    }
    let mut store = s.store()?;
    for name in selected(&mut store, &q)? {
        let mut mb = store.open(&name)?;
        let mails = mb.mails();
        let count = mails.len() as u32;
        let max_uid = mails.last().map_or(0, |m| m.uid.get());
        let uids: Vec<_> = mails
            .iter()
            .enumerate()
            .filter(|(i, m)| q.matches(m, *i as u32 + 1, count, max_uid))
            .map(|(_, m)| m.uid)
            .collect();
        mb.expunge(&uids)?;
        mb.sync_point()?;
    }
    Ok(())
}

/// `save [-m MAILBOX]` with the mail on stdin.
pub(super) fn save(s: &Session, mailbox: &str) -> Result<(), Failure> {
    let mut store = s.store()?;
    let name = parse_name(&store, mailbox)?;
    // A delivery: no need to look at the mails already there.
    let mut mb = store.open_appender(&name)?;
    let stdin = io::stdin();
    let mut input = stdin.lock();
    mb.save(SaveRequest::default(), &mut input)?;
    mb.commit()?;
    mb.sync_point()?;
    Ok(())
}

/// `mailbox …`
pub(super) fn mailbox(s: &Session, format: Option<Format>, cmd: &MailboxCommand) -> Result<(), Failure> {
    let mut store = s.store()?;
    let sep = store.hierarchy_separator();
    match cmd {
        MailboxCommand::List { subscribed, masks } => {
            let all = store.list()?;
            // Parents are listed (as doveadm lists \NoSelect parents); names that exist only as
            // subscriptions are listed only with -s.
            let parents: std::collections::HashSet<MailboxName> =
                all.iter().filter(|i| i.kind != MailboxKind::Nonexistent).filter_map(|i| i.name.parent()).collect();
            let mut out = stdout_printer(format.unwrap_or(Format::Flow), vec![Column::hidden("mailbox")]);
            let mut names: Vec<&MailboxInfo> = all
                .iter()
                .filter(|i| {
                    if *subscribed {
                        i.subscribed
                    } else {
                        i.kind != MailboxKind::Nonexistent || parents.iter().any(|p| p.starts_with(&i.name))
                    }
                })
                .filter(|i| masks.is_empty() || masks.iter().any(|m| mailbox_match(m, &i.name.join(sep), sep)))
                .collect();
            names.sort_by(|a, b| (!a.name.is_inbox(), &a.name).cmp(&(!b.name.is_inbox(), &b.name)));
            for i in names {
                out.row(&[Cell::Text(i.name.join(sep))])?;
            }
            out.finish()?;
        }
        MailboxCommand::Status { fields, masks } => {
            // doveadm's columns, in doveadm's order whatever order they are asked in.
            const ORDER: &[&str] = &[
                "messages",
                "recent",
                "uidnext",
                "uidvalidity",
                "unseen",
                "highestmodseq",
                "vsize",
                "guid",
                "firstsaved",
            ];
            let mut want: Vec<&str> = Vec::new();
            for f in fields.split_whitespace() {
                match f {
                    "all" => want.extend(ORDER),
                    f if ORDER.contains(&f) => want.push(f),
                    f => {
                        return Err(Failure::new(exit::USAGE, anyhow!("Invalid status field: {f}")));
                    }
                }
            }
            if want.is_empty() {
                return Err(Failure::new(exit::USAGE, anyhow!("No status fields")));
            }
            let cols: Vec<&str> = ORDER.iter().copied().filter(|f| want.contains(f)).collect();
            let mut columns = vec![Column::hidden("mailbox")];
            columns.extend(cols.iter().map(|c| Column::new(*c)));
            let mut out = stdout_printer(format.unwrap_or(Format::Flow), columns);
            for name in resolve(&mut store, masks, &[])? {
                let mut mb = store.open(&name)?;
                let st = mb.status();
                let mut row = vec![Cell::Text(name.join(sep))];
                for c in &cols {
                    row.push(Cell::Text(match *c {
                        "messages" => st.messages.to_string(),
                        "recent" => st.recent.to_string(),
                        "uidnext" => st.uid_next.to_string(),
                        "uidvalidity" => st.uid_validity.to_string(),
                        "unseen" => st.unseen.to_string(),
                        "highestmodseq" => st.highest_modseq.to_string(),
                        "guid" => st.guid.to_string(),
                        "vsize" => {
                            let mut total = 0u64;
                            for m in mb.mails() {
                                total += mb.virtual_size(m.uid)?;
                            }
                            total.to_string()
                        }
                        // The save date of the first mail, as doveadm prints it.
                        "firstsaved" => match mb.mails().first() {
                            Some(m) => mb.saved_date(m.uid)?.to_string(),
                            None => "never".to_owned(),
                        },
                        _ => unreachable!("fields were checked above"),
                    }));
                }
                out.row(&row)?;
            }
            out.finish()?;
        }
        MailboxCommand::Create { subscribe, guid, names } => {
            let guid: Option<Guid128> = match guid {
                Some(g) if names.len() > 1 => {
                    return Err(Failure::new(exit::USAGE, anyhow!("-g {g} needs exactly one mailbox")));
                }
                Some(g) => Some(
                    g.parse().map_err(|e: mailreplica::store::types::BadGuid| Failure::new(exit::USAGE, e.into()))?,
                ),
                None => None,
            };
            for n in names {
                let name = parse_name(&store, n)?;
                store.create_mailbox(&name, guid, None)?;
                if *subscribe {
                    store.set_subscribed(&name, true)?;
                }
            }
        }
        MailboxCommand::Delete { unsubscribe, recursive, names } => {
            for n in names {
                let name = parse_name(&store, n)?;
                let mut targets = vec![name.clone()];
                if *recursive {
                    let mut children: Vec<MailboxName> = store
                        .list()?
                        .into_iter()
                        .filter(|i| i.kind == MailboxKind::Mailbox && i.name != name && i.name.starts_with(&name))
                        .map(|i| i.name)
                        .collect();
                    // Deepest first.
                    children.sort_by_key(|c| std::cmp::Reverse(c.components().len()));
                    targets.splice(0..0, children);
                }
                for t in targets {
                    store.delete_mailbox(&t)?;
                    if *unsubscribe {
                        store.set_subscribed(&t, false)?;
                    }
                }
            }
        }
        MailboxCommand::Rename { subscriptions, old, new } => {
            let from = parse_name(&store, old)?;
            let to = parse_name(&store, new)?;
            store.rename_mailbox(&from, &to)?;
            if *subscriptions {
                // As doveadm does it: the old name is unsubscribed and the new one subscribed
                // (even if the old one was not); children's subscriptions stay as they are.
                store.set_subscribed(&from, false)?;
                store.set_subscribed(&to, true)?;
            }
        }
        MailboxCommand::Update {
            mailbox_guid,
            uid_validity,
            min_next_uid,
            min_first_recent_uid,
            min_highest_modseq,
            name,
        } => {
            let guid: Option<Guid128> = match mailbox_guid {
                Some(g) => Some(
                    g.parse().map_err(|e: mailreplica::store::types::BadGuid| Failure::new(exit::USAGE, e.into()))?,
                ),
                None => None,
            };
            if *uid_validity == Some(0) {
                return Err(Failure::new(exit::USAGE, anyhow!("--uid-validity 0 is not a valid UIDVALIDITY")));
            }
            let name = parse_name(&store, name)?;
            let mut mb = store.open(&name)?;
            mb.update(&mailreplica::store::MailboxUpdate {
                uid_validity: *uid_validity,
                guid,
                min_next_uid: *min_next_uid,
                min_first_recent_uid: *min_first_recent_uid,
                min_highest_modseq: *min_highest_modseq,
                replicated_modseq: None,
                peer_modseq: None,
                clear_history_lost: false,
            })?;
        }
        MailboxCommand::Subscribe { names } | MailboxCommand::Unsubscribe { names } => {
            let on = matches!(cmd, MailboxCommand::Subscribe { .. });
            for n in names {
                let name = parse_name(&store, n)?;
                store.set_subscribed(&name, on)?;
            }
        }
    }
    Ok(())
}

/// `user [MASK…]`
pub(super) fn user(s: &Session, format: Option<Format>, masks: &[String]) -> Result<(), Failure> {
    let db = &s.config.userdb;
    if masks.iter().any(|m| m.contains(['*', '?'])) {
        let stdout = io::stdout();
        let mut out = io::BufWriter::new(stdout.lock());
        for u in db.list()? {
            if masks.iter().any(|m| wildcard_match(m, &u.name)) {
                writeln!(out, "{}", u.name)?;
            }
        }
        out.flush()?;
        return Ok(());
    }
    let mut missing = false;
    let mut out = stdout_printer(format.unwrap_or(Format::Tab), vec![Column::new("field"), Column::new("value")]);
    for m in masks {
        let Some(u) = db.lookup(m)? else {
            tracing::error!("userdb lookup: user {m} doesn't exist");
            missing = true;
            continue;
        };
        let location =
            u.mail_location().map(str::to_owned).unwrap_or_else(|| format!("{:?}", s.config.mail_location.root));
        for (k, v) in [("uid", u.uid.to_string()), ("gid", u.gid.to_string()), ("home", u.home.display().to_string())] {
            out.row(&[Cell::Text(k.to_owned()), Cell::Text(v)])?;
        }
        if u.mail_location().is_some() {
            out.row(&[Cell::Text("mail".to_owned()), Cell::Text(location)])?;
        }
    }
    out.finish()?;
    if missing {
        return Err(Failure::new(exit::NOUSER, anyhow!("some users were not found")));
    }
    Ok(())
}
