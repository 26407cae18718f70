//! Reading records from FASTA/FASTQ inputs, one after the other, with needletail.
//!
//! Compression is detected from the first bytes (needletail's `compression` feature: gzip, bzip2, xz,
//! zstd). `-` reads standard input. Ids are the header up to the first whitespace (Biopython's
//! `record.id`, which VirNucPro uses); header bytes that are not UTF-8 are replaced (U+FFFD) and counted.
//! An input without any record is counted as empty, not an error; anything needletail cannot parse
//! is an error naming the file, the 1-based record number and, when known, the record id and line.

use std::collections::HashSet;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::path::PathBuf;

use needletail::errors::{ParseError, ParseErrorKind};
use needletail::parser::FastxReader;

use crate::DataError;
use crate::report::{DUPLICATE_CHECK_CAP, FileReport};

/// Counters the reader keeps (merged into the run report).
#[derive(Debug, Clone, Default)]
pub struct SourceStats {
    pub files: Vec<FileReport>,
    pub records_read: u64,
    pub records_empty: u64,
    pub duplicate_ids: u64,
    pub duplicate_check_capped: bool,
    pub non_utf8_ids: u64,
}

/// One record as handed to a callback: `record` is 1-based within its file.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    pub file: usize,
    pub record: u64,
    pub id: &'a str,
    /// Sequence without line breaks; may be empty (the record is then counted and skipped by the
    /// caller).
    pub seq: &'a [u8],
}

/// One input: a path (`-` = stdin) or an in-memory/streamed reader with a display name.
pub enum Input {
    Path(PathBuf),
    Reader(String, Box<dyn std::io::Read + Send>),
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Path(p) => write!(f, "Path({})", p.display()),
            Input::Reader(name, _) => write!(f, "Reader({name})"),
        }
    }
}

impl Input {
    fn name(&self) -> String {
        match self {
            Input::Path(p) => display_path(p),
            Input::Reader(name, _) => name.clone(),
        }
    }
}

/// All inputs as one stream of records.
pub struct Source {
    inputs: Vec<Option<Input>>,
    names: Vec<String>,
    next_file: usize,
    current: Option<Box<dyn FastxReader>>,
    record: u64,
    ids_seen: HashSet<u64, BuildHasherDefault<std::hash::DefaultHasher>>,
    id_buf: String,
    pub stats: SourceStats,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("inputs", &self.names)
            .field("next_file", &self.next_file)
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

pub(crate) fn display_path(p: &std::path::Path) -> String {
    if p.as_os_str() == "-" {
        "<stdin>".to_string()
    } else {
        p.display().to_string()
    }
}

impl Source {
    pub fn new(inputs: Vec<PathBuf>) -> Self {
        Self::from_inputs(inputs.into_iter().map(Input::Path).collect())
    }

    pub fn from_inputs(inputs: Vec<Input>) -> Self {
        Self {
            names: inputs.iter().map(Input::name).collect(),
            inputs: inputs.into_iter().map(Some).collect(),
            next_file: 0,
            current: None,
            record: 0,
            ids_seen: HashSet::default(),
            id_buf: String::new(),
            stats: SourceStats::default(),
        }
    }

    fn file_name(&self) -> String {
        self.names[self.next_file - 1].clone()
    }

    fn record_error(&self, e: &ParseError) -> DataError {
        DataError::Record {
            file: self.file_name(),
            record: self.record + 1,
            id: e.position.id.clone(),
            message: {
                let what = if e.msg.is_empty() {
                    format!("{:?}", e.kind)
                } else {
                    e.msg.clone()
                };
                match e.position.line {
                    0 => what,
                    line => format!("{what} (line {line})"),
                }
            },
        }
    }

    /// Opens the next input; `Ok(false)` when none is left.
    fn open_next(&mut self) -> Result<bool, DataError> {
        while self.next_file < self.inputs.len() {
            let input = self.inputs[self.next_file].take();
            let name = self.names[self.next_file].clone();
            self.next_file += 1;
            self.record = 0;
            self.stats.files.push(FileReport {
                path: name.clone(),
                ..FileReport::default()
            });
            let opened = match input {
                Some(Input::Path(p)) if p.as_os_str() == "-" => needletail::parse_fastx_stdin(),
                Some(Input::Path(p)) => needletail::parse_fastx_file(&p),
                Some(Input::Reader(_, r)) => needletail::parse_fastx_reader(r),
                None => continue,
            };
            match opened {
                Ok(reader) => {
                    self.current = Some(reader);
                    return Ok(true);
                }
                Err(e) if e.kind == ParseErrorKind::EmptyFile => {
                    if let Some(f) = self.stats.files.last_mut() {
                        f.empty = true;
                    }
                }
                Err(e) if e.kind == ParseErrorKind::Io => {
                    return Err(DataError::Open {
                        file: name,
                        message: e.msg,
                    });
                }
                Err(e) => return Err(self.record_error(&e)),
            }
        }
        Ok(false)
    }

    /// Calls `f` with the next record; `Ok(false)` after the last record of the last input.
    pub fn next_record<F: FnOnce(RecordRef<'_>)>(&mut self, f: F) -> Result<bool, DataError> {
        loop {
            if self.current.is_none() && !self.open_next()? {
                return Ok(false);
            }
            let Some(reader) = self.current.as_mut() else {
                continue;
            };
            match reader.next() {
                None => {
                    self.current = None;
                    if let Some(file) = self.stats.files.last_mut() {
                        file.empty = file.records == 0;
                    }
                }
                Some(Err(e))
                    if e.kind == ParseErrorKind::UnexpectedEnd
                        && e.format == Some(needletail::parser::Format::Fasta) =>
                {
                    // A FASTA file ending in a header with no sequence line: that last record
                    // has no sequence, like any other empty record (counted, skipped).
                    self.current = None;
                    self.record += 1;
                    self.stats.records_read += 1;
                    self.stats.records_empty += 1;
                    if let Some(file) = self.stats.files.last_mut() {
                        file.records += 1;
                    }
                }
                Some(Err(e)) => {
                    let err = self.record_error(&e);
                    self.current = None;
                    return Err(err);
                }
                Some(Ok(rec)) => {
                    self.record += 1;
                    let header = rec.id();
                    let first = header
                        .split(|b| b.is_ascii_whitespace())
                        .next()
                        .unwrap_or_default();
                    self.id_buf.clear();
                    match std::str::from_utf8(first) {
                        Ok(s) => self.id_buf.push_str(s),
                        Err(_) => {
                            self.stats.non_utf8_ids += 1;
                            self.id_buf.push_str(&String::from_utf8_lossy(first));
                        }
                    }
                    // Duplicate ids: 64-bit hashes of the raw id bytes, up to a fixed number of ids.
                    let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(first);
                    if self.ids_seen.contains(&h) {
                        self.stats.duplicate_ids += 1;
                    } else if self.ids_seen.len() < DUPLICATE_CHECK_CAP {
                        self.ids_seen.insert(h);
                    } else {
                        self.stats.duplicate_check_capped = true;
                    }
                    let seq = rec.seq();
                    self.stats.records_read += 1;
                    if seq.is_empty() {
                        self.stats.records_empty += 1;
                    }
                    if let Some(file) = self.stats.files.last_mut() {
                        file.records += 1;
                        file.residues += seq.len() as u64;
                    }
                    f(RecordRef {
                        file: self.next_file - 1,
                        record: self.record,
                        id: &self.id_buf,
                        seq: &seq,
                    });
                    return Ok(true);
                }
            }
        }
    }
}
