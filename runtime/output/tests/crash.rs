//! `kill -9` at random points, restart with `--resume` until done: the final file must be
//! byte-identical to an uninterrupted run's and pass the independent h5py check.
//!
//! The driver (`virnuc-output-synth`) prints phase markers, so the kills are spread over the whole
//! run: most land while packs are written and shards flushed (random delays after start), the rest
//! after `finishing` (during the merge, the rename or the clean-up).

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use virnuc_output::OutputDtype;
use virnuc_output::synthetic::splitmix64;

const N: u64 = 6000;
const HIDDEN: usize = 16;

fn driver(out: &Path, resume: bool) -> Command {
    driver_with(out, resume, &[])
}

fn driver_with(out: &Path, resume: bool, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_virnuc-output-synth"));
    cmd.arg("--out")
        .arg(out)
        .args(["--n", &N.to_string(), "--hidden", &HIDDEN.to_string()])
        .args([
            "--per-token",
            "--shard",
            "150",
            "--seed",
            "11",
            "--max-pack",
            "24",
        ])
        // A pause per pack stretches the pack phase to about a second, so delays of a few tens of
        // milliseconds interrupt it many times.
        .args(["--pause-us", "2000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if resume {
        cmd.arg("--resume");
    }
    cmd.args(extra);
    cmd
}

/// Spawns the driver and a thread forwarding its stdout lines.
fn spawn(out: &Path, resume: bool) -> (Child, mpsc::Receiver<String>) {
    let mut child = driver(out, resume).spawn().expect("driver starts");
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 = splitmix64(self.0);
        self.0 % bound.max(1)
    }
}

/// Kills `child` with SIGKILL; true if it was still running (the kill landed).
fn kill(child: &mut Child) -> bool {
    let alive = child.try_wait().expect("try_wait").is_none();
    // SIGKILL via std: Child::kill sends SIGKILL on Unix.
    let _ = child.kill();
    let status = child.wait().expect("wait");
    if alive && status.signal() == Some(9) {
        return true;
    }
    assert!(
        status.success() || status.signal() == Some(9),
        "driver failed: {status:?}: {}",
        stderr_of(child)
    );
    false
}

fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut text);
    }
    text
}

#[test]
fn twenty_kills_at_random_points_then_resume_gives_the_uninterrupted_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reference = dir.path().join("reference.h5");
    let started = Instant::now();
    let (mut child, rx) = spawn(&reference, false);
    let mut finishing_at = None;
    let mut open_at = None;
    for line in rx.iter() {
        if line == "finishing" {
            finishing_at = Some(started.elapsed());
        }
        if line.starts_with("open ") {
            open_at = Some(started.elapsed());
        }
    }
    let status = child.wait().expect("wait");
    assert!(status.success(), "reference run: {}", stderr_of(&mut child));
    let total = started.elapsed();
    let finish_phase = total - finishing_at.expect("finishing marker");
    let startup = open_at.expect("open marker");
    eprintln!("uninterrupted: {total:?}: start-up and open {startup:?}, finish {finish_phase:?}");

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    eprintln!("kill schedule seed {seed}");
    let mut rng = Rng(seed);
    let out = dir.path().join("out.h5");
    let mut kills_in_packs = 0;
    let mut kills_in_finish = 0;
    let mut completed = false;
    // Phase 1: kills at random delays after start, while packs are written and shards flushed.
    // Sequences durable at each restart ("open N"): journaled work is never lost, so this never
    // decreases.
    let mut durable = Vec::new();
    while kills_in_packs < 20 {
        let (mut child, rx) = spawn(&out, true);
        // One kill in four during start-up and `open` (resume checks); the others up to 120 ms
        // into the pack phase, where shards are written, renamed and journaled every ~30 ms.
        let startup_us = startup.as_micros() as u64;
        let delay = if rng.below(4) == 0 {
            rng.below(startup_us)
        } else {
            startup_us + rng.below(120_000)
        };
        std::thread::sleep(Duration::from_micros(delay));
        let landed = kill(&mut child);
        // The stdout thread ends once the pipe closes; collect what the run said.
        for line in rx.iter() {
            if let Some(n) = line.strip_prefix("open ") {
                durable.push(n.parse::<u64>().expect("count"));
            }
        }
        if landed {
            kills_in_packs += 1;
        } else {
            completed = true;
            break;
        }
    }
    eprintln!("durable sequences at each restart: {durable:?}");
    // A resume over an edited input is refused before it writes anything, names the sequence,
    // and leaves the working files as they were: the next resume continues the same work.
    if !completed {
        let journal = dir.path().join("out.h5.partial/journal");
        let before = std::fs::read(&journal).expect("journal");
        let o = driver_with(&out, true, &["--edit-first-done"])
            .output()
            .expect("driver runs");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(3), "{stderr}");
        assert!(
            stderr.contains("the input is not the one") && stderr.contains("was edited"),
            "{stderr}"
        );
        assert_eq!(std::fs::read(&journal).expect("journal"), before);
        assert!(!out.exists());
    }
    assert!(
        durable.windows(2).all(|w| w[0] <= w[1]),
        "durable work was lost"
    );
    assert!(
        durable.last().is_some_and(|&d| d > 0),
        "no shard became durable"
    );
    // Phase 2: kills after the `finishing` marker: during the merge, rename or clean-up.
    let window = finish_phase.as_micros() as u64 + 1;
    let mut attempts = 0;
    while !completed && kills_in_finish < 6 && attempts < 40 {
        attempts += 1;
        let (mut child, rx) = spawn(&out, true);
        let mut finishing = false;
        for line in rx.iter() {
            if line == "finishing" {
                finishing = true;
                break;
            }
        }
        if finishing {
            // Early attempts aim at the start of the finish (the merge); later ones reach further
            // (rename, clean-up), where the run may also complete before the kill.
            let reach = (window * attempts / 6).clamp(window / 6, window);
            std::thread::sleep(Duration::from_micros(rng.below(reach)));
        }
        if kill(&mut child) {
            kills_in_finish += 1;
        } else {
            completed = true;
        }
    }
    // Then run to completion.
    if !completed {
        let mut child = driver(&out, true).spawn().expect("driver starts");
        let status = child.wait().expect("wait");
        assert!(status.success(), "final resume: {}", stderr_of(&mut child));
    }
    eprintln!("kills: {kills_in_packs} while writing packs, {kills_in_finish} while finishing");
    assert!(kills_in_packs + kills_in_finish >= 20);
    assert!(kills_in_finish >= 1, "no kill landed in the finish phase");

    let partial = dir.path().join("out.h5.partial");
    assert!(!partial.exists(), "working files left behind");
    let want = std::fs::read(&reference).expect("reference");
    let got = std::fs::read(&out).expect("output");
    assert!(
        got == want,
        "killed-and-resumed output differs from the uninterrupted one"
    );
    common::h5py_check(&out, N, HIDDEN, OutputDtype::F32, true);
}

/// A full disk while the final file is written (here: a file-size limit, so that shards fit and
/// the final file does not): the temp file and the merge scratch go, the shards stay, and
/// `--resume` then finishes the same file as an uninterrupted run.
#[test]
fn finish_failure_removes_its_temp_file_and_keeps_the_shards() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = |out: &Path| {
        vec![
            "--out".to_string(),
            out.display().to_string(),
            "--n".into(),
            "2000".into(),
            "--hidden".into(),
            "16".into(),
            "--per-token".into(),
            "--shard".into(),
            "100".into(),
        ]
    };
    let reference = dir.path().join("reference.h5");
    let o = Command::new(env!("CARGO_BIN_EXE_virnuc-output-synth"))
        .args(args(&reference))
        .output()
        .expect("driver runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let size = std::fs::metadata(&reference).expect("reference").len();
    let out = dir.path().join("out.h5");
    // 1 KiB blocks: shards (~130 KB) fit, the final file (`size`) does not. SIGXFSZ ignored, so
    // the write fails with an error as on a full disk.
    let limit = size / 1024 / 2;
    let script = format!("ulimit -f {limit}; trap '' XFSZ; exec \"$0\" \"$@\"");
    let o = Command::new("bash")
        .args(["-c", &script, env!("CARGO_BIN_EXE_virnuc-output-synth")])
        .args(args(&out))
        .output()
        .expect("driver runs");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot write the final file") && stderr.contains("--resume"),
        "{stderr}"
    );
    let work = dir.path().join("out.h5.partial");
    let left: Vec<String> = std::fs::read_dir(&work)
        .expect("work kept")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !left.iter().any(|n| n.ends_with(".tmp") || n == "merge"),
        "{left:?}"
    );
    assert_eq!(
        left.iter().filter(|n| n.starts_with("shard-")).count(),
        20,
        "{left:?}"
    );
    assert!(!out.exists());
    let o = Command::new(env!("CARGO_BIN_EXE_virnuc-output-synth"))
        .args(args(&out))
        .arg("--resume")
        .output()
        .expect("driver runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(&out).expect("out"),
        std::fs::read(&reference).expect("reference")
    );
}
