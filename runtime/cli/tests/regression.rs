//! Regression tests of the run's reliability, named after the defect each one pins down (issue 10
//! of the tracker: inputs, resume, flags, reports, exit codes). Each drives the binary as a user
//! would; the model is esm2_t6_8M with random weights, exported once (the venv's Python).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{export_random_t6, text, virnuc_with_env};
use serde_json::Value;

fn virnuc(args: &[&str]) -> Output {
    virnuc_with_env(args, &[])
}

/// One export shared by the tests of this file.
fn model() -> &'static Path {
    static MODEL: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = MODEL.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model");
        export_random_t6(&path, 7);
        (dir, path)
    });
    path
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `n` short proteins, distinct ids, deterministic residues.
fn proteins(n: usize, salt: usize) -> String {
    const AA: &[u8] = b"ACDEFGHIKLMNPQRSTVWY";
    let mut out = String::new();
    for i in 0..n {
        let len = 6 + (i * 7 + salt) % 11;
        let seq: String = (0..len)
            .map(|k| AA[(i * 13 + k * 5 + salt) % AA.len()] as char)
            .collect();
        out.push_str(&format!(">p{i}\n{seq}\n"));
    }
    out
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("write");
    p
}

fn json(path: &Path) -> Value {
    let t = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&t).expect("report JSON")
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// The accounting every successful report must satisfy, resumed or not.
fn assert_accounting(r: &Value) {
    let d = &r["data"];
    assert_eq!(d["complete"], true, "{r}");
    let packing = &d["packing"];
    assert_eq!(
        u(&d["stages"], "sequences"),
        u(packing, "sequences"),
        "every sequence packed: {r}"
    );
    assert_eq!(
        u(r, "sequences_this_run") + u(r, "sequences_skipped_resume"),
        u(r, "sequences"),
        "{r}"
    );
    assert_eq!(u(r, "sequences_skipped_resume"), u(d, "skipped_resume"));
    assert_eq!(
        u(r, "packs") + u(d, "packs_skipped_resume"),
        u(packing, "packs"),
        "packs run + packs skipped = packs made: {r}"
    );
    assert_eq!(r["resumed"], u(d, "skipped_resume") > 0, "{r}");
}

/// `embed` in protein mode on the CPU with small packs and shards (many of both).
fn embed_args<'a>(inputs: &[&'a str], out: &'a str, report: &'a str) -> Vec<&'a str> {
    embed_args_sized(inputs, out, report, ("96", "8"))
}

fn embed_args_sized<'a>(
    inputs: &[&'a str],
    out: &'a str,
    report: &'a str,
    (budget, shard): (&'a str, &'a str),
) -> Vec<&'a str> {
    let mut a = vec!["embed"];
    a.extend_from_slice(inputs);
    a.extend_from_slice(&[
        "--model",
        s(model()),
        "--mode",
        "protein",
        "--ep",
        "cpu",
        "--toks-per-batch",
        budget,
        "--shard-sequences",
        shard,
        "--out",
        out,
        "--report",
        report,
        "-q",
    ]);
    a
}

/// A FASTQ whose only record is malformed (quality shorter than the sequence).
const BAD_FASTQ: &str = "@bad\nMKVLA\n+\nII\n";

/// Runs `embed good.fa bad.fq`: everything of good.fa is embedded and made durable, then the
/// input error stops the run. Returns (good.fa, out, work folder).
fn interrupted_by_an_input_error(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let good = write(dir, "good.fa", &proteins(60, 0));
    let bad = write(dir, "bad.fq", BAD_FASTQ);
    let out = dir.join("out.h5");
    let rep = dir.join("failed.json");
    let o = virnuc(&embed_args(&[s(&good), s(&bad)], s(&out), s(&rep)));
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let work = dir.join("out.h5.partial");
    assert!(work.join("journal").is_file(), "{}", text(&o));
    (good, out, work)
}

#[test]
fn issue10_1_resume_refuses_a_changed_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (good, out, work) = interrupted_by_an_input_error(d);
    let journal = std::fs::read(work.join("journal")).expect("journal");
    let rep = d.join("r.json");
    let resume = |inputs: &[&str]| {
        let mut a = embed_args(inputs, s(&out), s(&rep));
        a.push("--resume");
        virnuc(&a)
    };
    // One residue of record p3 edited after it was embedded.
    let text_good = std::fs::read_to_string(&good).expect("read");
    let line = text_good.lines().nth(7).expect("p3's sequence").to_string();
    let edited_line = format!("W{}", &line[1..]);
    assert_ne!(line, edited_line);
    let edited = write(
        d,
        "edited.fa",
        &text_good.replacen(&format!("\n{line}\n"), &format!("\n{edited_line}\n"), 1),
    );
    // Two records swapped; and a file put in front of the original one.
    let swapped = write(
        d,
        "swapped.fa",
        &text_good
            .replacen(">p0\n", ">tmp\n", 1)
            .replacen(">p1\n", ">p0\n", 1)
            .replacen(">tmp\n", ">p1\n", 1),
    );
    let extra = write(d, "extra.fa", &proteins(3, 5).replace(">p", ">x"));
    for (inputs, what) in [
        (vec![s(&edited)], "other residues than when it was embedded"),
        (vec![s(&swapped)], "now but was"),
        (vec![s(&extra), s(&good)], "now but was"),
    ] {
        let o = resume(&inputs);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(3), "{inputs:?}: {}", text(&o));
        assert!(
            err.contains("the input is not the one") && err.contains(what),
            "{err}"
        );
        // The file and the sequence are named.
        assert!(
            err.contains(inputs[0]) && err.contains("sequence "),
            "{err}"
        );
        // Nothing was written: no output, and the working folder is as the interrupted run left it.
        assert!(!out.exists());
        assert_eq!(
            std::fs::read(work.join("journal")).expect("journal"),
            journal
        );
        let r = json(&rep);
        assert_eq!(r["complete"], false);
        assert_eq!(r["exit_status"], 3);
        assert_eq!(r["sequences_this_run"], 0);
    }
    // The input it did read: continued, and the same file as one uninterrupted run makes.
    let o = resume(&[s(&good)]);
    assert!(o.status.success(), "{}", text(&o));
    let r = json(&rep);
    assert_accounting(&r);
    assert_eq!(u(&r, "sequences"), 60);
    let fresh = d.join("fresh.h5");
    let o = virnuc(&embed_args(
        &[s(&good)],
        s(&fresh),
        s(&d.join("fresh.json")),
    ));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read(&out).expect("out"),
        std::fs::read(&fresh).expect("fresh")
    );
}

/// Starts `embed -` with standard input kept open and empty: the run takes the output's lock,
/// then waits for input.
fn start_waiting_run(dir: &Path, out: &Path, rep: &Path) -> Child {
    let args = embed_args(&["-"], s(out), s(rep));
    let child = Command::new(env!("CARGO_BIN_EXE_virnuc-trt"))
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let lock = dir.join(format!(
        "{}.partial/lock",
        out.file_name().and_then(|n| n.to_str()).expect("name")
    ));
    let t0 = Instant::now();
    while !std::fs::read_to_string(&lock).is_ok_and(|t| t.starts_with("pid ")) {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the run did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn sigterm(child: &Child) {
    let pid = child.id().to_string();
    let o = Command::new("kill")
        .args(["-TERM", &pid])
        .output()
        .expect("kill");
    assert!(o.status.success());
}

#[test]
fn issue10_7_report_accounting_holds_after_a_resume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (good, out, _) = interrupted_by_an_input_error(d);
    // Resume with the bad file replaced by more records: the work done is kept and checked, the
    // new records are embedded.
    let more = write(d, "more.fa", &proteins(25, 9).replace(">p", ">m"));
    let rep = d.join("r.json");
    let mut args = embed_args(&[s(&good), s(&more)], s(&out), s(&rep));
    args.push("--resume");
    let o = virnuc(&args);
    assert!(o.status.success(), "{}", text(&o));
    let r = json(&rep);
    assert_accounting(&r);
    assert_eq!(u(&r, "sequences"), 85, "{r}");
    assert_eq!(u(&r, "sequences_skipped_resume"), 60, "{r}");
    assert_eq!(u(&r, "sequences_this_run"), 25, "{r}");
    assert!(u(&r["data"], "packs_skipped_resume") > 0, "{r}");
    assert!(u(&r, "packs") < u(&r["data"]["packing"], "packs"), "{r}");
    // An uninterrupted run: nothing skipped, the same identities.
    let o = virnuc(&embed_args(
        &[s(&good), s(&more)],
        s(&d.join("fresh.h5")),
        s(&rep),
    ));
    assert!(o.status.success(), "{}", text(&o));
    let r = json(&rep);
    assert_accounting(&r);
    assert_eq!(u(&r, "sequences_skipped_resume"), 0);
    assert_eq!(u(&r, "packs"), u(&r["data"]["packing"], "packs"));
}

#[test]
fn issue10_8_failures_write_a_report() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let good = write(d, "good.fa", &proteins(20, 2));
    let out = d.join("out.h5");
    // An unwritable report is found before any work.
    let missing = d.join("no-such-folder/r.json");
    let o = virnuc(&embed_args(&[s(&good)], s(&out), s(&missing)));
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("run report"));
    assert!(!out.exists() && !d.join("out.h5.partial").exists());
    // An input error: the report says what failed and what was done.
    let bad = write(d, "bad.fq", BAD_FASTQ);
    let rep = d.join("r.json");
    let o = virnuc(&embed_args(&[s(&good), s(&bad)], s(&out), s(&rep)));
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let r = json(&rep);
    assert_eq!(r["complete"], false);
    assert_eq!(r["exit_status"], 3);
    assert!(
        r["error"].as_str().is_some_and(|e| e.contains("bad.fq")),
        "{r}"
    );
    assert_eq!(u(&r, "sequences_this_run"), 20, "{r}");
    assert_eq!(u(&r, "sequences_kept"), 20, "{r}");
    assert!(u(&r["data"], "records_read") >= 20, "{r}");
    // A signal: exit 128 + 15 and the report; nothing was durable, so no working folder stays.
    let out2 = d.join("out2.h5");
    let child = start_waiting_run(d, &out2, &rep);
    sigterm(&child);
    let o = child.wait_with_output().expect("wait");
    assert_eq!(o.status.code(), Some(143), "{}", text(&o));
    let r = json(&rep);
    assert_eq!(r["exit_status"], 143);
    assert!(
        r["error"].as_str().is_some_and(|e| e.contains("SIGTERM")),
        "{r}"
    );
    assert!(!d.join("out2.h5.partial").exists());
    // A full disk when the report is written: exit 4, said so.
    if Path::new("/dev/full").exists() {
        let o = virnuc(&embed_args(&[s(&good)], s(&d.join("out3.h5")), "/dev/full"));
        assert_eq!(o.status.code(), Some(4), "{}", text(&o));
        assert!(String::from_utf8_lossy(&o.stderr).contains("cannot write the run report"));
    }
}

#[test]
fn issue10_10_work_folder_messages_say_what_is_true() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // A live run holds the folder: a second run is told so, with or without --resume.
    let fasta = write(d, "p.fa", &proteins(5, 4));
    let out = d.join("out.h5");
    let rep = d.join("r.json");
    let mut child = start_waiting_run(d, &out, &rep);
    let second = d.join("second.json");
    for resume in [false, true] {
        let mut a = embed_args(&[s(&fasta)], s(&out), s(&second));
        if resume {
            a.push("--resume");
        }
        let o = virnuc(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(4), "{}", text(&o));
        let pid = format!("pid {}", child.id());
        assert!(
            err.contains("in use by a running virnuc-trt") && err.contains(&pid),
            "{err}"
        );
        assert!(!err.contains("interrupted"), "{err}");
    }
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(b">late\nMKV\n").expect("stdin");
    }
    let o = child.wait_with_output().expect("wait");
    assert!(o.status.success(), "{}", text(&o));
    // An input error before anything was durable leaves no working folder behind.
    let bad = write(d, "bad.fq", BAD_FASTQ);
    let out2 = d.join("out2.h5");
    let o = virnuc(&embed_args(&[s(&bad)], s(&out2), s(&rep)));
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(!d.join("out2.h5.partial").exists(), "{}", text(&o));
    // Work left by a failed run: the next plain run is told what is there and what to do.
    let sub = d.join("again");
    std::fs::create_dir(&sub).expect("mkdir");
    let (good, out3, work) = interrupted_by_an_input_error(&sub);
    let o = virnuc(&embed_args(&[s(&good)], s(&out3), s(&rep)));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(
        err.contains("60 sequences done") && err.contains("not in use") && err.contains("--resume"),
        "{err}"
    );
    // A corrupt journal: refused with the way out.
    std::fs::write(work.join("journal"), "garbage\n").expect("write");
    let mut a = embed_args(&[s(&good)], s(&out3), s(&rep));
    a.push("--resume");
    let o = virnuc(&a);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(
        err.contains("corrupt") && err.contains("delete the folder"),
        "{err}"
    );
}

#[test]
fn issue10_5_numeric_flags_are_range_checked() {
    // None of these needs a model or an input: the range check comes before any work.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("o.h5");
    let o = s(&out);
    let base = ["embed", "x.fa", "--model", "m", "--out", o];
    for (flag, value) in [
        ("--workers", "100000"),
        ("--threads", "100000"),
        ("--prefetch", "1000000000"),
        ("--prefetch", "0"),
        ("--toks-per-batch", "2"),
        ("--toks-per-batch", "100000000000"),
        ("--chunk", "2"),
        ("--chunk", "100000000"),
        ("--max-residues", "0"),
        ("--shard-sequences", "0"),
        ("--device", "-1"),
    ] {
        let mut a = base.to_vec();
        let pair = format!("{flag}={value}");
        a.push(&pair);
        let t0 = Instant::now();
        let r = virnuc(&a);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{flag} {value}: {}", text(&r));
        assert!(
            err.contains(flag) && err.contains("out of range") && err.contains(" to "),
            "{flag} {value}: {err}"
        );
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
    for a in [
        vec!["translate", "x.fa", "--chunk", "1"],
        vec![
            "gate",
            "--candidate",
            "c",
            "--reference",
            "r",
            "--input",
            "x.fa",
            "--sample",
            "0",
        ],
        vec![
            "build",
            "--model",
            "m",
            "--ep",
            "cpu",
            "--out",
            o,
            "--budgets",
            "1,64",
        ],
        vec![
            "build",
            "--model",
            "m",
            "--ep",
            "cpu",
            "--out",
            o,
            "--autotune-seconds",
            "1e9",
        ],
    ] {
        let r = virnuc(&a);
        assert_eq!(r.status.code(), Some(2), "{a:?}: {}", text(&r));
        assert!(String::from_utf8_lossy(&r.stderr).contains("out of range"));
    }
    assert!(!out.exists());
}

#[test]
fn issue10_11_model_json_must_agree_with_the_graph() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let fasta = write(d, "p.fa", &proteins(3, 6));
    let run = |m: &Path| {
        let out = d.join("o.h5");
        let _ = std::fs::remove_file(&out);
        virnuc(
            &embed_args(&[s(&fasta)], s(&out), s(&d.join("r.json")))
                .iter()
                .map(|a| if *a == s(model()) { s(m) } else { a })
                .collect::<Vec<_>>(),
        )
    };
    let o = run(model());
    assert!(o.status.success(), "{}", text(&o));
    let original: Value =
        serde_json::from_str(&std::fs::read_to_string(model().join("model.json")).expect("read"))
            .expect("json");
    for (field, edit) in [
        ("model.name", ["model", "name"]),
        ("random_weights", ["random_weights", ""]),
    ] {
        let m = d.join(field);
        std::fs::create_dir(&m).expect("mkdir");
        std::fs::copy(model().join("model.onnx"), m.join("model.onnx")).expect("copy");
        let mut meta = original.clone();
        if edit[1].is_empty() {
            meta[edit[0]] = Value::Bool(false);
        } else {
            meta[edit[0]][edit[1]] = Value::String("esm2_t36_3B".into());
        }
        std::fs::write(m.join("model.json"), meta.to_string()).expect("write");
        let o = run(&m);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(5), "{field}: {}", text(&o));
        assert!(
            err.contains(&format!("`{field}`")) && err.contains("mismatch"),
            "{err}"
        );
    }
}

#[test]
fn issue10_12_exit_codes_tell_failures_apart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let fasta = write(d, "p.fa", &proteins(12, 8));
    let m = s(model());
    let gate = |candidate: &str, reference: &str| {
        virnuc(&[
            "gate",
            "--candidate",
            candidate,
            "--reference",
            reference,
            "--input",
            s(&fasta),
            "--mode",
            "protein",
            "--sample",
            "12",
            "--ep",
            "cpu",
        ])
    };
    // Passed: the model against itself.
    let o = gate(m, m);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // Failed: another random model is far from it.
    let other = d.join("other");
    export_random_t6(&other, 8);
    let o = gate(s(&other), m);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    // Could not run: the reference does not exist.
    let o = gate(m, s(&d.join("nope")));
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    // Usage, input, output errors of embed and translate.
    let out = d.join("o.h5");
    let o = virnuc(&["embed", s(&fasta), "--out", s(&out)]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = virnuc(&["translate", s(&d.join("missing.fa"))]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let o = virnuc(&embed_args(
        &[s(&fasta)],
        s(&d.join("no-such-folder/o.h5")),
        s(&d.join("r.json")),
    ));
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    // Every --help states the scheme.
    for sub in ["embed", "translate", "build", "gate"] {
        let o = virnuc(&[sub, "--help"]);
        let help = String::from_utf8_lossy(&o.stdout);
        assert!(
            help.contains("Exit status: 0") && help.contains("130/143"),
            "{sub}: {help}"
        );
    }
}

#[test]
fn issue10_13_a_failed_build_leaves_no_engine_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("engine");
    let o = virnuc(&[
        "build",
        "--model",
        s(&dir.path().join("no-such-model")),
        "--ep",
        "cpu",
        "--out",
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(!out.exists(), "{}", text(&o));
    // A folder that was there before stays.
    std::fs::create_dir(&out).expect("mkdir");
    let mut f = std::fs::File::create(out.join("notes.txt")).expect("create");
    f.write_all(b"mine").expect("write");
    let o = virnuc(&[
        "build",
        "--model",
        s(&dir.path().join("no-such-model")),
        "--ep",
        "cpu",
        "--out",
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(out.join("notes.txt").is_file());
}
