//! doveadm's output formatters (`-f flow|pager|tab|table|json`), byte for byte where it
//! matters for diffing our output against doveadm's (`tab`, `flow`, `pager`, `json`).
//!
//! A value is either a short string or a "stream" (a mail's text); doveadm prints streams
//! differently in every formatter, quirks included (in `tab`, a stream takes one extra column
//! separator), and so do we.

use std::io::{self, Write};

/// An output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// `key=value` pairs on one line.
    Flow,
    /// `key: value` lines, records separated by a form feed.
    Pager,
    /// A header line, then tab-separated values.
    Tab,
    /// Aligned columns.
    Table,
    /// A JSON array of objects with string values.
    Json,
}

/// A column.
#[derive(Debug, Clone)]
pub(crate) struct Column {
    /// Key (JSON) and title (other formats).
    pub(crate) title: String,
    /// Print the value without its title in `flow`/`pager` (like doveadm's mailbox column).
    pub(crate) hide_title: bool,
}

impl Column {
    /// A column with a visible title.
    pub(crate) fn new(title: impl Into<String>) -> Self {
        Self { title: title.into(), hide_title: false }
    }

    /// A column whose title is hidden in `flow` and `pager`.
    pub(crate) fn hidden(title: impl Into<String>) -> Self {
        Self { title: title.into(), hide_title: true }
    }
}

/// One value.
#[derive(Debug, Clone)]
pub(crate) enum Cell {
    /// A short value.
    Text(String),
    /// A mail's contents.
    Stream(Vec<u8>),
}

/// Writes rows in one of the formats.
pub(crate) struct Printer<W: Write> {
    format: Format,
    columns: Vec<Column>,
    out: W,
    rows: usize,
    table: Vec<Vec<String>>,
    /// `pager`: no short value printed yet (doveadm's `first_page`).
    first_page: bool,
}

impl<W: Write> Printer<W> {
    /// A printer for `columns`.
    pub(crate) fn new(format: Format, columns: Vec<Column>, out: W) -> Self {
        Self { format, columns, out, rows: 0, table: Vec::new(), first_page: true }
    }

    /// Prints one row (one value per column).
    pub(crate) fn row(&mut self, cells: &[Cell]) -> io::Result<()> {
        debug_assert_eq!(cells.len(), self.columns.len());
        let first = self.rows == 0;
        self.rows += 1;
        match self.format {
            Format::Flow => {
                let n = cells.len();
                for (i, (c, col)) in cells.iter().zip(&self.columns).enumerate() {
                    if !col.hide_title {
                        write!(self.out, "{}=", col.title)?;
                    }
                    match c {
                        Cell::Text(s) => self.out.write_all(s.as_bytes())?,
                        Cell::Stream(b) => self.out.write_all(b)?,
                    }
                    self.out.write_all(if i + 1 < n { b" " } else { b"\n" })?;
                }
            }
            Format::Pager => {
                // doveadm writes the record separator only before a short value in the first
                // column, and only short values end the first page: with a stream in the first
                // column, records are not separated at all.
                for (i, (c, col)) in cells.iter().zip(&self.columns).enumerate() {
                    match c {
                        Cell::Text(s) => {
                            if i == 0 && !self.first_page {
                                self.out.write_all(b"\x0c\n")?;
                            }
                            self.first_page = false;
                            if !col.hide_title {
                                write!(self.out, "{}: ", col.title)?;
                            }
                            writeln!(self.out, "{s}")?;
                        }
                        Cell::Stream(b) => {
                            if !col.hide_title {
                                writeln!(self.out, "{}:", col.title)?;
                            }
                            self.out.write_all(b)?;
                        }
                    }
                }
            }
            Format::Tab => {
                if first {
                    self.write_tab_header()?;
                }
                let n = cells.len();
                let mut idx = 0;
                for c in cells {
                    match c {
                        Cell::Text(s) => {
                            if idx > 0 {
                                self.out.write_all(b"\t")?;
                            }
                            self.out.write_all(s.as_bytes())?;
                        }
                        Cell::Stream(b) => {
                            if !b.is_empty() {
                                if idx > 0 {
                                    self.out.write_all(b"\t")?;
                                }
                                self.out.write_all(b)?;
                            }
                            // doveadm ends a stream with an empty value, which costs one more
                            // separator when other columns precede it.
                            if idx > 0 {
                                self.out.write_all(b"\t")?;
                            }
                        }
                    }
                    idx += 1;
                }
                if idx == n {
                    self.out.write_all(b"\n")?;
                }
            }
            Format::Table => {
                self.table.push(
                    cells
                        .iter()
                        .map(|c| match c {
                            Cell::Text(s) => s.clone(),
                            Cell::Stream(b) => String::from_utf8_lossy(b).into_owned(),
                        })
                        .collect(),
                );
            }
            Format::Json => {
                self.out.write_all(if first { b"[{" } else { b",{" })?;
                for (i, (c, col)) in cells.iter().zip(&self.columns).enumerate() {
                    if i > 0 {
                        self.out.write_all(b",")?;
                    }
                    write!(self.out, "\"{}\":\"", json_escape(col.title.as_bytes()))?;
                    match c {
                        Cell::Text(s) => self.out.write_all(json_escape(s.as_bytes()).as_bytes())?,
                        Cell::Stream(b) => self.out.write_all(json_escape(b).as_bytes())?,
                    }
                    self.out.write_all(b"\"")?;
                }
                self.out.write_all(b"}")?;
            }
        }
        Ok(())
    }

    fn write_tab_header(&mut self) -> io::Result<()> {
        let titles: Vec<&str> = self.columns.iter().map(|c| c.title.as_str()).collect();
        writeln!(self.out, "{}", titles.join("\t"))
    }

    /// Ends the output (prints buffered tables, closes JSON arrays) and flushes.
    pub(crate) fn finish(mut self) -> io::Result<()> {
        match self.format {
            Format::Tab if self.rows == 0 => self.write_tab_header()?,
            Format::Json => self.out.write_all(if self.rows == 0 { b"[]" } else { b"]" })?,
            Format::Table => {
                let mut widths: Vec<usize> = self.columns.iter().map(|c| c.title.chars().count()).collect();
                for r in &self.table {
                    for (w, v) in widths.iter_mut().zip(r) {
                        *w = (*w).max(v.chars().count());
                    }
                }
                let line = |vals: Vec<&str>, out: &mut W| -> io::Result<()> {
                    let parts: Vec<String> = vals
                        .iter()
                        .zip(&widths)
                        .map(|(v, w)| format!("{v}{}", " ".repeat(w - v.chars().count())))
                        .collect();
                    writeln!(out, "{}", parts.join(" "))
                };
                line(self.columns.iter().map(|c| c.title.as_str()).collect(), &mut self.out)?;
                for r in &self.table {
                    line(r.iter().map(String::as_str).collect(), &mut self.out)?;
                }
            }
            _ => {}
        }
        self.out.flush()
    }
}

/// JSON string escaping as Dovecot's `json_append_escaped` does it.
fn json_escape(data: &[u8]) -> String {
    let s = String::from_utf8_lossy(data);
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x08' => out.push_str("\\b"),
            '\x0c' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(format: Format) -> String {
        let mut buf = Vec::new();
        let mut p = Printer::new(format, vec![Column::new("uid"), Column::new("text"), Column::new("flags")], &mut buf);
        p.row(&[Cell::Text("1".into()), Cell::Stream(b"a\n".to_vec()), Cell::Text("\\Seen".into())]).unwrap();
        p.row(&[Cell::Text("2".into()), Cell::Stream(b"b\n".to_vec()), Cell::Text("".into())]).unwrap();
        p.finish().unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn pager_with_a_stream_first() {
        // Observed from doveadm 2.3.19 for `fetch 'text uid'`: no separator between records.
        let mut buf = Vec::new();
        let mut p = Printer::new(Format::Pager, vec![Column::new("text"), Column::new("uid")], &mut buf);
        p.row(&[Cell::Stream(b"a\n".to_vec()), Cell::Text("1".into())]).unwrap();
        p.row(&[Cell::Stream(b"b".to_vec()), Cell::Text("2".into())]).unwrap();
        p.finish().unwrap();
        assert_eq!(String::from_utf8(buf).unwrap(), "text:\na\nuid: 1\ntext:\nbuid: 2\n");
    }

    #[test]
    fn formats_match_doveadm() {
        // Observed from doveadm 2.3.19 for `fetch 'uid text flags'`.
        assert_eq!(render(Format::Tab), "uid\ttext\tflags\n1\ta\n\t\t\\Seen\n2\tb\n\t\t\n");
        assert_eq!(render(Format::Pager), "uid: 1\ntext:\na\nflags: \\Seen\n\x0c\nuid: 2\ntext:\nb\nflags: \n");
        assert_eq!(render(Format::Flow), "uid=1 text=a\n flags=\\Seen\nuid=2 text=b\n flags=\n");
        assert_eq!(
            render(Format::Json),
            "[{\"uid\":\"1\",\"text\":\"a\\n\",\"flags\":\"\\\\Seen\"},{\"uid\":\"2\",\"text\":\"b\\n\",\"flags\":\"\"}]"
        );
    }
}
