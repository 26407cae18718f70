//! The journal: one line per durable shard, appended and fsynced after the shard's atomic rename.
//!
//! A shard counts only once its line is in the journal, so a crash at any point leaves either a
//! journaled, complete shard or a file that resume deletes. Each line carries its own CRC so a
//! damaged line is never trusted; a line without its newline (torn append) is ignored.

use crate::OutputError;
use std::path::Path;

pub(crate) const HEADER: &str = "virnuc-output journal 2";

/// One journaled shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub name: String,
    pub records: u64,
    pub token_rows: u64,
    pub payload_len: u64,
    pub payload_crc: u32,
    /// Digest of the input the shard's rows were computed from (see `shard::combine`).
    pub digest: u64,
}

impl Entry {
    pub fn to_line(&self) -> String {
        let body = format!(
            "{} records={} tokens={} bytes={} crc={:08x} digest={:016x}",
            self.name,
            self.records,
            self.token_rows,
            self.payload_len,
            self.payload_crc,
            self.digest
        );
        let check = crc32fast::hash(body.as_bytes());
        format!("{body} check={check:08x}\n")
    }

    fn parse(line: &str) -> Option<Self> {
        let (body, check) = line.rsplit_once(" check=")?;
        if u32::from_str_radix(check, 16).ok()? != crc32fast::hash(body.as_bytes()) {
            return None;
        }
        let mut fields = body.split(' ');
        let name = fields.next()?.to_string();
        let mut field = |key: &str| {
            fields
                .next()
                .and_then(|f| f.strip_prefix(key))
                .map(str::to_string)
        };
        let records = field("records=")?.parse().ok()?;
        let token_rows = field("tokens=")?.parse().ok()?;
        let payload_len = field("bytes=")?.parse().ok()?;
        let payload_crc = u32::from_str_radix(&field("crc=")?, 16).ok()?;
        let digest = u64::from_str_radix(&field("digest=")?, 16).ok()?;
        // Names are ours (`shard-N.bin`); anything else would let a damaged journal point elsewhere.
        if !valid_shard_name(&name) {
            return None;
        }
        Some(Self {
            name,
            records,
            token_rows,
            payload_len,
            payload_crc,
            digest,
        })
    }
}

pub(crate) fn shard_name(number: u64) -> String {
    format!("shard-{number:08}.bin")
}

/// The number in `shard-N.bin`, if `name` is one.
pub(crate) fn shard_number(name: &str) -> Option<u64> {
    name.strip_prefix("shard-")?
        .strip_suffix(".bin")?
        .parse()
        .ok()
}

fn valid_shard_name(name: &str) -> bool {
    shard_number(name).is_some() && !name.contains('/')
}

/// Parsed journal: the entries whose lines are complete and intact, and how many were not.
#[derive(Debug, Default)]
pub(crate) struct Parsed {
    pub entries: Vec<Entry>,
    pub damaged_lines: usize,
}

pub(crate) fn read(path: &Path) -> Result<Parsed, OutputError> {
    let text = std::fs::read(path).map_err(|source| OutputError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8_lossy(&text);
    let mut parsed = Parsed::default();
    let mut lines = text.split_inclusive('\n');
    match lines.next() {
        Some(first) if first.trim_end() == HEADER => {}
        _ => {
            return Err(OutputError::CorruptJournal {
                path: path.to_path_buf(),
                message: format!("first line is not `{HEADER}`"),
            });
        }
    }
    for line in lines {
        let Some(line) = line.strip_suffix('\n') else {
            // Torn final append: the shard it described is not durable.
            parsed.damaged_lines += 1;
            continue;
        };
        match Entry::parse(line) {
            Some(entry) => parsed.entries.push(entry),
            None => parsed.damaged_lines += 1,
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_damage_is_rejected() {
        let entry = Entry {
            name: shard_name(7),
            records: 3,
            token_rows: 9,
            payload_len: 1234,
            payload_crc: 0xdead_beef,
            digest: 0x0123_4567_89ab_cdef,
        };
        let line = entry.to_line();
        assert_eq!(
            Entry::parse(line.trim_end()).as_ref(),
            Some(&entry),
            "{line}"
        );
        let damaged = line.replace("records=3", "records=4");
        assert_eq!(Entry::parse(damaged.trim_end()), None);
        let evil = Entry {
            name: "../x".into(),
            ..entry.clone()
        };
        assert_eq!(Entry::parse(evil.to_line().trim_end()), None);

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal");
        let torn = &line[..line.len() - 4];
        std::fs::write(&path, format!("{HEADER}\n{line}{damaged}{torn}")).expect("write");
        let parsed = read(&path).expect("reads");
        assert_eq!(parsed.entries, vec![entry]);
        assert_eq!(parsed.damaged_lines, 2);
    }
}
