//! Crash-test driver: writes synthetic packs (deterministic values, FFD-like shuffled order) through
//! `EmbeddingWriter`, so a test can `kill -9` it anywhere and restart it with `--resume`.
//!
//! ```text
//! virnuc-output-synth --out FILE.h5 --n 5000 --hidden 16 [--dtype f32|f16] [--per-token]
//!     [--shard 200] [--seed 1] [--max-pack 24] [--pause-us 0] [--resume] [--edit-first-done]
//! ```
//! Prints `open <done>`, `finishing`, `complete` or `already-complete` on stdout (flushed) so the
//! test knows which phase it interrupted. Every sequence, done or not, goes through the writer's
//! input check as the data path does it; `--edit-first-done` changes the input digest of the
//! first sequence an earlier run wrote (a record edited between the runs). Exit 0 on success,
//! 2 on usage errors, 3 when the input differs from the interrupted run's, 1 on output errors.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use virnuc_output::{EmbeddingWriter, OutputConfig, OutputDtype, OutputError, synthetic};

struct Args {
    out: PathBuf,
    n: u64,
    hidden: usize,
    dtype: OutputDtype,
    per_token: bool,
    shard: usize,
    seed: u64,
    max_pack: usize,
    pause_us: u64,
    resume: bool,
    edit_first_done: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        out: PathBuf::new(),
        n: 1000,
        hidden: 16,
        dtype: OutputDtype::F32,
        per_token: false,
        shard: 100,
        seed: 1,
        max_pack: 24,
        pause_us: 0,
        resume: false,
        edit_first_done: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--out" => args.out = PathBuf::from(value()?),
            "--n" => args.n = num(value()?)?,
            "--hidden" => args.hidden = num(value()?)? as usize,
            "--dtype" => {
                args.dtype = match value()?.as_str() {
                    "f32" => OutputDtype::F32,
                    "f16" => OutputDtype::F16,
                    other => return Err(format!("--dtype {other}: f32 or f16")),
                }
            }
            "--per-token" => args.per_token = true,
            "--shard" => args.shard = num(value()?)? as usize,
            "--seed" => args.seed = num(value()?)?,
            "--max-pack" => args.max_pack = num(value()?)? as usize,
            "--pause-us" => args.pause_us = num(value()?)?,
            "--resume" => args.resume = true,
            "--edit-first-done" => args.edit_first_done = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.out.as_os_str().is_empty() {
        return Err("--out is required".into());
    }
    Ok(args)
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // The parent reads these markers; a closed pipe only means nobody listens.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn run(args: &Args) -> Result<(), OutputError> {
    let config = OutputConfig {
        path: args.out.clone(),
        hidden_size: args.hidden,
        per_token: args.per_token,
        dtype: args.dtype,
        attributes: vec![
            (
                "model".into(),
                r#"{"name": "synthetic", "hidden_size": 16}"#.into(),
            ),
            (
                "precision".into(),
                format!("{:?}", args.dtype).to_lowercase(),
            ),
            ("execution_provider".into(), "none".into()),
            ("random_weights".into(), "true".into()),
        ],
        resume: args.resume,
        shard_sequences: args.shard,
    };
    let mut writer = match EmbeddingWriter::open(config) {
        Err(OutputError::AlreadyComplete { .. }) => {
            say("already-complete");
            return Ok(());
        }
        other => other?,
    };
    let done = writer.done();
    let check = writer.input_check();
    say(&format!("open {}", writer.resume_info().sequences_done));
    let edited = if args.edit_first_done {
        (0..args.n).find(|&i| done(i))
    } else {
        None
    };
    let digest = |i: u64| {
        let m = synthetic::meta(i);
        let salt = u32::from(edited == Some(i));
        virnuc_core::sequence_digest(&m.id, [m.residues, salt])
    };
    // The data path checks sequences in input order as it reads them.
    for i in 0..args.n {
        if let Err(e) = check.check(i, &synthetic::id(i), digest(i), 0) {
            writer.abandon()?;
            return Err(e);
        }
    }
    if let Err(e) = check.finish() {
        writer.abandon()?;
        return Err(e);
    }
    for pack in synthetic::ffd_order(args.n, 256, args.max_pack, args.seed) {
        // As the real pipeline does: sequences already durable are not recomputed.
        let todo: Vec<u64> = pack.into_iter().filter(|&i| !done(i)).collect();
        if todo.is_empty() {
            continue;
        }
        let (metas, mean, states, cu) = synthetic::pack(&todo, args.hidden);
        let digests: Vec<u64> = todo.iter().map(|&i| digest(i)).collect();
        writer.write_pack_with_digests(&metas, &digests, &mean, Some((&states, &cu)))?;
        if args.pause_us > 0 {
            std::thread::sleep(std::time::Duration::from_micros(args.pause_us));
        }
    }
    say("finishing");
    writer.finish(args.n)?;
    say("complete");
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("virnuc-output-synth: {message}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("virnuc-output-synth: {e}");
            match e {
                OutputError::InputChanged { .. } => ExitCode::from(3),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
