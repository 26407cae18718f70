//! Reading records from FASTA/FASTQ inputs, one after the other, with needletail.
//!
//! Compression is detected from the first bytes (gzip, bzip2, xz, zstd) and decoded here, to the end
//! of the file: every gzip member, bzip2 stream (pbzip2/lbzip2 write many), xz stream and zstd frame.
//! `-` reads standard input. Ids are the header up to the first whitespace (Biopython's `record.id`,
//! which VirNucPro uses); header bytes that are not UTF-8 are replaced (U+FFFD) and counted.
//!
//! As Biopython's FASTA parser (`Bio.SeqIO.parse(..., "fasta")`, which VirNucPro reads with) does,
//! spaces, tabs and carriage returns inside FASTA sequence lines are removed, and counted. FASTQ
//! sequence lines are taken as they are (Biopython's FASTQ parser strips nothing inside them either).
//!
//! Only an input that really holds no byte (after decompression) is empty: it is counted, not an
//! error. A folder, an unreadable file, a compressed file that cannot be decoded (cut short, damaged)
//! and anything needletail cannot parse are errors naming the file and, past the first bytes, the
//! 1-based record number and, when known, the record id and line.
//!
//! The first letters of every file are checked against the mode ([`ModeCheck`]): protein records in
//! nucleotide mode, or DNA in protein mode, stop the run with an error naming the flag to use.

use std::collections::HashSet;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use needletail::errors::{ParseError, ParseErrorKind};
use needletail::parser::{FastxReader, Format};

use crate::report::{DUPLICATE_CHECK_CAP, FileReport};
use crate::{DataError, Mode};

/// Counters the reader keeps (merged into the run report).
#[derive(Debug, Clone, Default)]
pub struct SourceStats {
    pub files: Vec<FileReport>,
    pub records_read: u64,
    pub records_empty: u64,
    pub duplicate_ids: u64,
    pub duplicate_check_capped: bool,
    pub non_utf8_ids: u64,
    /// Records whose header has no id (`>` followed by nothing or by whitespace).
    pub empty_ids: u64,
    /// Spaces, tabs and carriage returns removed from inside FASTA sequence lines.
    pub whitespace_removed: u64,
}

/// How far the reader got: bytes read from the input files as they are on disk (compressed bytes for
/// compressed files), and their total size when every input is a file. Shared with the reader
/// thread; cheap to clone and to poll from a progress bar.
#[derive(Debug, Clone, Default)]
pub struct InputProgress {
    bytes: Arc<AtomicU64>,
    total: Option<u64>,
}

impl InputProgress {
    /// The total is the sum of the inputs' sizes, `None` when an input is standard input or a stream
    /// (or its size cannot be read).
    pub fn for_paths(paths: &[PathBuf]) -> Self {
        let total = paths
            .iter()
            .map(|p| {
                if p.as_os_str() == "-" {
                    return None;
                }
                std::fs::metadata(p)
                    .ok()
                    .filter(std::fs::Metadata::is_file)
                    .map(|m| m.len())
            })
            .sum();
        Self {
            bytes: Arc::default(),
            total,
        }
    }

    /// Bytes read so far (on-disk bytes, all inputs).
    pub fn bytes_read(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Σ input sizes, when known.
    pub fn total_bytes(&self) -> Option<u64> {
        self.total
    }
}

/// Counts the bytes read through it into an [`InputProgress`].
struct Counting<R> {
    inner: R,
    bytes: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Letters of each file looked at by the [`ModeCheck`] (about a hundred short reads or proteins).
pub const MODE_SAMPLE_LETTERS: u64 = 20_000;
/// Fewer letters than this in a whole file decide nothing (a few short peptides can be all `ACGT`).
pub const MODE_MIN_LETTERS: u64 = 50;
/// Nucleotide mode refuses a file when more of its sampled letters than this are not nucleotide
/// codes. Proteins have about 35% (E F I L P Q, and X, Z, J, O); DNA and RNA none, whatever their
/// case, N runs or IUPAC ambiguity codes.
pub const MAX_NON_NUCLEOTIDE_SHARE: f64 = 0.10;
/// Protein mode refuses a file when at least this share of its sampled letters is A C G T U N:
/// about 25% in proteins, ~100% in DNA/RNA.
pub const MIN_ACGTUN_SHARE_FOR_DNA: f64 = 0.90;

/// Checks that the first letters of a file fit the mode (`--force-mode` turns it off).
#[derive(Debug, Clone)]
pub struct ModeCheck {
    mode: Mode,
    letters: u64,
    /// Letters that are IUPAC nucleotide codes (ACGTU, N, RYSWKMBDHV), any case.
    nucleotide: u64,
    /// Letters that are A C G T U or N, any case.
    acgtun: u64,
    decided: bool,
}

impl ModeCheck {
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            letters: 0,
            nucleotide: 0,
            acgtun: 0,
            decided: false,
        }
    }

    fn reset(&mut self) {
        *self = Self::new(self.mode);
    }

    /// Adds the letters of one record (up to the sample size); `Err(reason)` once the sample is full
    /// and does not fit the mode.
    pub fn add(&mut self, seq: &[u8]) -> Result<(), String> {
        if self.decided {
            return Ok(());
        }
        for &b in seq {
            if self.letters >= MODE_SAMPLE_LETTERS {
                break;
            }
            if !b.is_ascii_alphabetic() {
                continue;
            }
            self.letters += 1;
            let u = b.to_ascii_uppercase();
            if matches!(u, b'A' | b'C' | b'G' | b'T' | b'U' | b'N') {
                self.acgtun += 1;
                self.nucleotide += 1;
            } else if b"RYSWKMBDHV".contains(&u) {
                self.nucleotide += 1;
            }
        }
        if self.letters >= MODE_SAMPLE_LETTERS {
            self.verdict()
        } else {
            Ok(())
        }
    }

    /// The decision at the end of a file (or of the sample); `Ok` when too few letters were seen.
    pub fn verdict(&mut self) -> Result<(), String> {
        if self.decided || self.letters < MODE_MIN_LETTERS {
            return Ok(());
        }
        self.decided = true;
        let n = self.letters as f64;
        let pct = |x: f64| format!("{:.0}%", 100.0 * x);
        match self.mode {
            Mode::Nucleotide => {
                let other = (self.letters - self.nucleotide) as f64 / n;
                if other > MAX_NON_NUCLEOTIDE_SHARE {
                    return Err(format!(
                        "this looks like protein, not DNA: {} of the first {} letters are not \
                         nucleotide codes (DNA has none); run with --mode protein \
                         (or --force-mode to translate it as DNA anyway)",
                        pct(other),
                        self.letters
                    ));
                }
            }
            Mode::Protein => {
                let dna = self.acgtun as f64 / n;
                if dna >= MIN_ACGTUN_SHARE_FOR_DNA {
                    return Err(format!(
                        "this looks like DNA/RNA, not protein: {} of the first {} letters are \
                         A, C, G, T, U or N; run with --mode nucleotide (or --force-mode to embed \
                         it as protein anyway)",
                        pct(dna),
                        self.letters
                    ));
                }
            }
        }
        Ok(())
    }
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
    seq_buf: Vec<u8>,
    mode_check: Option<ModeCheck>,
    progress: InputProgress,
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
            seq_buf: Vec::new(),
            mode_check: None,
            progress: InputProgress::default(),
            stats: SourceStats::default(),
        }
    }

    /// Checks the first letters of each file against `mode` ([`ModeCheck`]).
    pub fn check_mode(mut self, mode: Mode) -> Self {
        self.mode_check = Some(ModeCheck::new(mode));
        self
    }

    /// Counts the bytes read into `progress` (see [`InputProgress`]).
    pub fn with_progress(mut self, progress: InputProgress) -> Self {
        self.progress = progress;
        self
    }

    /// A file is open whose mode check has not decided yet (records read from it may still be refused).
    pub fn mode_pending(&self) -> bool {
        self.current.is_some()
            && self
                .mode_check
                .as_ref()
                .is_some_and(|c| !c.decided && c.letters < MODE_SAMPLE_LETTERS)
    }

    /// Index of the input being read (the last one opened).
    pub fn current_file(&self) -> usize {
        self.next_file.saturating_sub(1)
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
                let what = match e.kind {
                    ParseErrorKind::UnexpectedEnd => format!(
                        "the input ends in the middle of this {} record (the file is cut short)",
                        match e.format {
                            Some(Format::Fastq) => "FASTQ",
                            _ => "FASTA",
                        }
                    ),
                    ParseErrorKind::Io => format!("read error: {}", e.msg),
                    _ if e.msg.is_empty() => format!("{:?}", e.kind),
                    _ => e.msg.clone(),
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
            if let Some(check) = self.mode_check.as_mut() {
                check.reset();
            }
            self.stats.files.push(FileReport {
                path: name.clone(),
                ..FileReport::default()
            });
            let Some(input) = input else { continue };
            let open_error = |message: String| DataError::Open {
                file: name.clone(),
                message,
            };
            let plain = match open_input(input, &self.progress).map_err(open_error)? {
                Some(plain) => plain,
                None => {
                    if let Some(f) = self.stats.files.last_mut() {
                        f.empty = true;
                    }
                    continue;
                }
            };
            match needletail::parse_fastx_reader(plain) {
                Ok(reader) => {
                    self.current = Some(reader);
                    return Ok(true);
                }
                Err(e) if e.kind == ParseErrorKind::Io => return Err(open_error(e.msg)),
                Err(e) => return Err(self.record_error(&e)),
            }
        }
        Ok(false)
    }

    /// The mode check's verdict at the end of the current file.
    fn end_of_file_check(&mut self) -> Result<(), DataError> {
        match self.mode_check.as_mut().map(ModeCheck::verdict) {
            Some(Err(message)) => Err(DataError::Mode {
                file: self.file_name(),
                message,
            }),
            _ => Ok(()),
        }
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
                    self.end_of_file_check()?;
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
                    self.end_of_file_check()?;
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
                    if first.is_empty() {
                        self.stats.empty_ids += 1;
                    }
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
                    let raw = rec.seq();
                    let seq: &[u8] = if rec.format() == Format::Fasta
                        && memchr::memchr3(b' ', b'\t', b'\r', &raw).is_some()
                    {
                        self.seq_buf.clear();
                        self.seq_buf.extend(
                            raw.iter()
                                .copied()
                                .filter(|b| !matches!(b, b' ' | b'\t' | b'\r')),
                        );
                        self.stats.whitespace_removed += (raw.len() - self.seq_buf.len()) as u64;
                        &self.seq_buf
                    } else {
                        &raw
                    };
                    if let Some(Err(message)) = self.mode_check.as_mut().map(|c| c.add(seq)) {
                        // Refused before the record is handed over.
                        let err = DataError::Mode {
                            file: self.file_name(),
                            message: match self.record {
                                1 => format!("record 1: {message}"),
                                n => format!("records 1-{n}: {message}"),
                            },
                        };
                        self.current = None;
                        return Err(err);
                    }
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
                        seq,
                    });
                    return Ok(true);
                }
            }
        }
    }
}

/// Compression formats recognized by their first two bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    Gzip,
    Bzip2,
    Xz,
    Zstd,
}

impl Compression {
    fn detect(magic: &[u8]) -> Option<Self> {
        match magic {
            [0x1f, 0x8b, ..] => Some(Self::Gzip),
            [b'B', b'Z', ..] => Some(Self::Bzip2),
            [0xfd, b'7', ..] => Some(Self::Xz),
            [0x28, 0xb5, ..] => Some(Self::Zstd),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Bzip2 => "bzip2",
            Self::Xz => "xz",
            Self::Zstd => "zstd",
        }
    }
}

type BoxRead = Box<dyn Read + Send>;

/// Reads until `buf` is full or the end; `Interrupted` is retried.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Opens one input as its decompressed bytes: `Ok(None)` when it really holds nothing (no byte, or
/// a compressed file that decodes to no byte); `Err(message)` for a folder, an unreadable file or a
/// compressed file whose first bytes do not decode. The first bytes are read here, so needletail
/// never takes a read error for an empty file.
fn open_input(input: Input, progress: &InputProgress) -> Result<Option<BoxRead>, String> {
    let raw: BoxRead = match input {
        Input::Path(p) if p.as_os_str() == "-" => Box::new(std::io::stdin()),
        Input::Path(p) => {
            if p.is_dir() {
                return Err(
                    "it is a directory, not a FASTA/FASTQ file (give the files in it, \
                     e.g. DIR/*.fa)"
                        .into(),
                );
            }
            Box::new(std::fs::File::open(&p).map_err(|e| e.to_string())?)
        }
        Input::Reader(_, r) => r,
    };
    let mut raw = Counting {
        inner: raw,
        bytes: progress.bytes.clone(),
    };
    let mut magic = [0u8; 2];
    let n = read_up_to(&mut raw, &mut magic).map_err(|e| e.to_string())?;
    if n == 0 {
        return Ok(None);
    }
    let whole = std::io::Cursor::new(magic[..n].to_vec()).chain(raw);
    let compression = Compression::detect(&magic[..n]);
    let mut decoded: BoxRead = match compression {
        None => Box::new(whole),
        Some(Compression::Gzip) => Box::new(flate2::read::MultiGzDecoder::new(whole)),
        Some(Compression::Bzip2) => Box::new(bzip2::read::MultiBzDecoder::new(whole)),
        Some(Compression::Xz) => Box::new(liblzma::read::XzDecoder::new_multi_decoder(whole)),
        Some(Compression::Zstd) => Box::new(
            zstd::stream::read::Decoder::new(whole)
                .map_err(|e| format!("cannot start the zstd decoder: {e}"))?,
        ),
    };
    // The first decoded bytes: a decoder error here is a damaged or cut file, not an empty one.
    let mut head = [0u8; 2];
    let n = read_up_to(&mut decoded, &mut head).map_err(|e| match compression {
        Some(c) => format!(
            "not a valid {} file ({e}): it is damaged or cut short",
            c.name()
        ),
        None => e.to_string(),
    })?;
    // One byte cannot hold a record (needletail needs two to tell FASTA from FASTQ): a line break
    // is an empty file, anything else is not what it should be.
    match (n, head[0]) {
        (0, _) => return Ok(None),
        (1, b) if b.is_ascii_whitespace() => return Ok(None),
        (1, b) => {
            return Err(format!(
                "it holds one byte ({:?}), which is no FASTA/FASTQ record",
                char::from(b)
            ));
        }
        _ => {}
    }
    Ok(Some(Box::new(
        std::io::Cursor::new(head[..n].to_vec()).chain(decoded),
    )))
}
