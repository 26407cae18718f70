//! `virnuc-trt build`: a model export → an engine folder for one GPU model (or CPU) and one ONNX
//! Runtime.
//!
//! ```text
//! DIR/model.onnx (+ model.onnx.data)   the graph, optimized offline by ONNX Runtime for the EP
//! DIR/model.json                       the exporter's metadata, onnx_sha256 updated to the graph above
//! DIR/tokenizer.json                   the export's tokenizer, for families that have one (DNABERT-S)
//! DIR/manifest.json                    device, runtime, EP, precision, tuned budget + autotune table
//! DIR/trt/                             TensorRT engine and timing caches (TensorRT EP only)
//! ```
//!
//! An engine folder is also a model folder: [`virnuc_engine::open_engine`] opens it as it opens an
//! export.
//! The manifest is written last, so a failed build never leaves a folder that passes for an engine.
//!
//! Precision: when the asked precision differs from the export's, the graph is exported again from the
//! source recorded in its metadata (`python -m virnuc_export …`). The exporter is a graph builder that
//! knows which nodes stay in fp32 (layer norms and softmax accumulate in fp32); converting a finished
//! graph with a generic fp16 converter would have to rediscover that. Without Python or the exporter,
//! the error gives the exact command to run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use ort::session::Session;
use virnuc_core::{ModelMetadata, TokenizerSpec};

use crate::autotune;
use crate::manifest::{
    AutotuneRow, CudaGraphSetting, DeviceKind, HostFacts, MANIFEST_FILE, MANIFEST_FORMAT, Manifest,
    SourceModel, TensorRtSetting,
};
use crate::options::cuda_provider;
pub use crate::options::{BuildOptions, CudaGraphMode, OptLevel};
use crate::trt_config::{self, TrtPlan};
use virnuc_engine::{
    EngineError, EngineOptions, Ep, ModelFiles, OrtContext, Result, custom_op, open_engine,
    runtime, sha256_file,
};

/// The exporter invocation that re-exports `meta`'s source at `precision` into `out`
/// (arguments after `python -m virnuc_export`). Pure, so it is tested without Python.
pub fn reexport_args(meta: &ModelMetadata, precision: &str, out: &Path) -> Result<Vec<String>> {
    let mut args: Vec<String> = Vec::new();
    let src = &meta.source;
    match (src.kind.as_str(), &src.path, src.seed) {
        ("random", _, Some(seed)) => {
            args.extend(["--random".into(), meta.model.name.clone()]);
            args.extend(["--seed".into(), seed.to_string()]);
            // A random export may have fewer layers than its config (`--layers`, for tests).
            args.extend(["--layers".into(), meta.model.num_layers.to_string()]);
        }
        ("hf", Some(p), _) => args.extend(["--hf".into(), p.clone()]),
        ("fair-esm", Some(p), _) => args.extend(["--fair-esm".into(), p.clone()]),
        (kind, path, seed) => {
            return Err(EngineError::Model(format!(
                "cannot re-export at {precision}: the metadata's source (kind `{kind}`, path {path:?}, \
                 seed {seed:?}) does not say where the weights are; export at {precision} yourself \
                 (python -m virnuc_export … --precision {precision}) and build from that"
            )));
        }
    }
    args.extend(["--attention".into(), meta.attention.clone()]);
    args.push(if meta.fused { "--fused" } else { "--no-fused" }.into());
    args.extend(["--precision".into(), precision.to_string()]);
    if meta.outputs.iter().any(|o| o.name == "hidden") {
        args.push("--per-token".into());
    }
    args.extend(["--repr-layer".into(), meta.repr_layer.to_string()]);
    args.extend(["--out".into(), out.display().to_string()]);
    Ok(args)
}

/// The folder holding `virnuc_export`.
fn exporter_dir(options: &BuildOptions) -> Option<PathBuf> {
    let has = |d: &Path| d.join("virnuc_export").join("__init__.py").is_file();
    if let Some(d) = &options.exporter_dir {
        return Some(d.clone());
    }
    if let Some(root) = std::env::var_os("VIRNUC_ROOT") {
        let d = PathBuf::from(root).join("export");
        if has(&d) {
            return Some(d);
        }
    }
    let mut starts = vec![std::env::current_dir().ok()];
    starts.push(std::env::current_exe().ok());
    for start in starts.into_iter().flatten() {
        for dir in start.ancestors() {
            let d = dir.join("export");
            if has(&d) {
                return Some(d);
            }
        }
    }
    None
}

fn shell_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            if w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:".contains(c))
            {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs the exporter; returns the command line for the manifest.
fn reexport(
    options: &BuildOptions,
    meta: &ModelMetadata,
    precision: &str,
    out: &Path,
) -> Result<String> {
    let args = reexport_args(meta, precision, out)?;
    let python = options
        .python
        .clone()
        .or_else(|| std::env::var_os("VIRNUC_PYTHON").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("python3"));
    let exporter = exporter_dir(options);
    let mut words = Vec::new();
    if let Some(d) = &exporter {
        words.push(format!("PYTHONPATH={}", d.display()));
    }
    words.push(python.display().to_string());
    words.extend(["-m".into(), "virnuc_export".into()]);
    words.extend(args.iter().cloned());
    let line = shell_words(&words);
    let manual = |why: String| {
        EngineError::Model(format!(
            "the model is {} and {precision} was asked: re-exporting it failed: {why}. \
             Run the export yourself (from the project's venv: `source tools/setup.sh`):\n  {line}\n\
             then `virnuc-trt build --model {}`",
            meta.precision,
            out.display()
        ))
    };
    let Some(dir) = exporter else {
        return Err(manual(
            "the exporter package (export/virnuc_export) was not found: pass --exporter DIR or set VIRNUC_ROOT"
                .into(),
        ));
    };
    let mut path_var = dir.display().to_string();
    if let Some(old) = std::env::var_os("PYTHONPATH").filter(|v| !v.is_empty()) {
        path_var = format!("{path_var}:{}", old.to_string_lossy());
    }
    let output = Command::new(&python)
        .args(["-m", "virnuc_export"])
        .args(&args)
        .env("PYTHONPATH", path_var)
        .output()
        .map_err(|e| manual(format!("cannot run {}: {e}", python.display())))?;
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = err.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(manual(format!(
            "{} exited with {}: {}",
            python.display(),
            output.status,
            tail.join(" | ")
        )));
    }
    Ok(line)
}

/// Host facts for the EP (GPU through nvidia-smi, CPU model otherwise).
fn probe_host(ep: Ep, device_id: i32, ort_version: &str) -> Result<HostFacts> {
    let kind = if ep == Ep::Cpu {
        DeviceKind::Cpu
    } else {
        DeviceKind::Gpu
    };
    HostFacts::probe(kind, device_id, ort_version)
}

/// Saves `src` optimized at `level` for `ep` to `dst` (ORT offline mode).
fn optimize_offline(
    src: &Path,
    dst: &Path,
    ep: Ep,
    options: &BuildOptions,
    level: OptLevel,
    external: bool,
    virnuc: bool,
) -> Result<()> {
    let (device_id, intra_threads) = (options.device_id, options.intra_threads);
    let env = runtime::environment()?;
    let where_ = || format!("offline optimization of {}", src.display());
    let mut b = Session::builder(env)
        .ctx(where_)?
        .with_no_environment_execution_providers()
        .ctx(where_)?;
    let eps = match ep {
        Ep::Cpu => vec![ort::ep::CPU::default().build().error_on_failure()],
        Ep::Cuda => cuda_provider(device_id, false)?,
        Ep::TensorRt | Ep::Auto => {
            return Err(EngineError::Model(format!(
                "offline optimization is for the cpu and cuda providers, not {}",
                ep.name()
            )));
        }
    };
    b = b
        .with_execution_providers(eps)
        .map_err(|e| EngineError::Provider {
            ep: ep.name(),
            reason: format!("cannot be registered: {}", e.message()),
        })?;
    b = b
        .with_optimization_level(level.ort())
        .ctx(where_)?
        .with_optimized_model_path(dst)
        .ctx(where_)?;
    if intra_threads > 0 {
        b = b.with_intra_threads(intra_threads).ctx(where_)?;
    }
    if external {
        // Graphs over 2 GiB cannot be one protobuf: the weights go to model.onnx.data beside it.
        b = b
            .with_config_entry(
                "session.optimized_model_external_initializers_file_name",
                "model.onnx.data",
            )
            .ctx(where_)?
            .with_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes",
                "1024",
            )
            .ctx(where_)?;
    }
    let domain = custom_op::domain().ctx(|| "cannot build the VarlenAttention op".into())?;
    // The CUDA kernel too, so that partitioning places VarlenAttention on the GPU (as at run time)
    // rather than on the CPU with copies around it baked into the saved graph.
    #[cfg(feature = "cuda")]
    let domain = if ep == Ep::Cuda && virnuc {
        virnuc_engine::kernel_dir::add_cuda_op(domain, options.kernel_dir.as_deref(), "cuda")?
    } else {
        domain
    };
    #[cfg(not(feature = "cuda"))]
    let _ = virnuc;
    b = b.with_operators(domain).ctx(where_)?;
    let session = custom_op::commit_session(b, src).ctx(where_)?;
    drop(session);
    if !dst.is_file() {
        return Err(EngineError::Model(format!(
            "ONNX Runtime did not write the optimized graph {}",
            dst.display()
        )));
    }
    Ok(())
}

fn copy_graph(src: &ModelFiles, out: &Path) -> Result<()> {
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to).map(|_| ()).map_err(|e| {
            EngineError::Model(format!(
                "cannot copy {} to {}: {e}",
                from.display(),
                to.display()
            ))
        })
    };
    copy(&src.onnx, &out.join("model.onnx"))?;
    let data = external_data_of(&src.onnx);
    if data.is_file() {
        copy(&data, &out.join("model.onnx.data"))?;
    }
    Ok(())
}

/// The export's tokenizer file (DNABERT-S), copied to the same place relative to the engine's
/// model.json: an engine folder is opened as a model folder, and its metadata names the tokenizer
/// (and its sha256, checked at open) relative to itself. Nothing for the ESM-2 alphabet.
fn copy_tokenizer(src: &ModelFiles, meta: &ModelMetadata, out: &Path) -> Result<()> {
    let TokenizerSpec::HfTokenizers { file, .. } = &meta.tokenizer else {
        return Ok(());
    };
    let from = src.tokenizer_file(meta).ok_or_else(|| {
        EngineError::Model(format!(
            "{} names no tokenizer file",
            src.metadata.display()
        ))
    })?;
    let to = out.join(file);
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
    }
    std::fs::copy(&from, &to).map_err(|e| {
        EngineError::Model(format!(
            "cannot copy the tokenizer {} to {}: {e}",
            from.display(),
            to.display()
        ))
    })?;
    Ok(())
}

/// `model.onnx` → `model.onnx.data` (the exporter's external-data file name).
fn external_data_of(onnx: &Path) -> PathBuf {
    let mut name = onnx.file_name().unwrap_or_default().to_os_string();
    name.push(".data");
    onnx.with_file_name(name)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> EngineError {
    EngineError::Model(format!("cannot {what} {}: {e}", path.display()))
}

/// The outcome of a build.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// Builds the engine folder. `log` receives one line per step (the CLI prints them).
pub fn build_engine(options: &BuildOptions, log: &mut dyn FnMut(&str)) -> Result<BuildOutcome> {
    let ep = match options.ep {
        Ep::Auto => {
            return Err(EngineError::Model(
                "build needs an explicit --ep (cpu, cuda or tensorrt): an engine is built for one provider"
                    .into(),
            ));
        }
        ep => ep,
    };
    if let Some(p) = &options.precision
        && p != "fp16"
        && p != "fp32"
    {
        return Err(EngineError::Model(format!(
            "unknown precision `{p}` (fp16, fp32)"
        )));
    }
    let out = &options.out;
    if out.join(MANIFEST_FILE).exists() || out.join("model.onnx").exists() {
        if !options.overwrite {
            return Err(EngineError::Model(format!(
                "{} already holds an engine or model; pass --overwrite to replace it",
                out.display()
            )));
        }
        // The manifest goes first: an interrupted rebuild must not leave the old one vouching.
        for f in [MANIFEST_FILE, "model.onnx", "model.onnx.data", "model.json"] {
            let p = out.join(f);
            if p.exists() {
                std::fs::remove_file(&p).map_err(|e| io_err("remove", &p, e))?;
            }
        }
    }
    std::fs::create_dir_all(out).map_err(|e| io_err("create", out, e))?;

    let library = runtime::init(options.ort_lib.as_deref())?;
    // Identify the device first: a build that cannot record its GPU is refused before any work.
    let host = probe_host(ep, options.device_id, &library.version)?;
    log(&format!(
        "device: {} ({}); ONNX Runtime {} from {}",
        host.device.name,
        ep.name(),
        library.version,
        library.path.display()
    ));

    let files = ModelFiles::locate(&options.model)?;
    let mut meta = files.load_metadata(false)?;
    let mut source_files = files.clone();
    let mut reexported_with = None;
    let reexport_dir = out.join(".reexport");
    if let Some(p) = &options.precision
        && *p != meta.precision
    {
        log(&format!(
            "re-exporting {} at {p} (the export is {})",
            meta.model.name, meta.precision
        ));
        if reexport_dir.exists() {
            std::fs::remove_dir_all(&reexport_dir)
                .map_err(|e| io_err("remove", &reexport_dir, e))?;
        }
        let line = reexport(options, &meta, p, &reexport_dir)?;
        let new_files = ModelFiles::locate(&reexport_dir)?;
        let new_meta = new_files.load_metadata(false)?;
        if new_meta.model != meta.model
            || new_meta.source.sha256 != meta.source.sha256
            || new_meta.source.seed != meta.source.seed
            || new_meta.precision != *p
        {
            return Err(EngineError::Model(format!(
                "the re-export ({line}) does not match {}: model config, checkpoint sha256, seed or \
                 precision differ",
                files.metadata.display()
            )));
        }
        log(&format!("re-exported: {line}"));
        reexported_with = Some(line);
        source_files = new_files;
        meta = new_meta;
    }

    let engine_onnx = out.join("model.onnx");
    let external = external_data_of(&source_files.onnx).is_file();
    let level = if ep == Ep::TensorRt {
        // TensorRT parses the standard graph itself; ORT's contrib fusions would hide nodes from it.
        OptLevel::None
    } else {
        options.opt_level
    };
    if level == OptLevel::None {
        copy_graph(&source_files, out)?;
    } else {
        log(&format!(
            "optimizing the graph offline ({}, {} provider)",
            level.name(),
            ep.name()
        ));
        optimize_offline(
            &source_files.onnx,
            &engine_onnx,
            ep,
            options,
            level,
            external,
            meta.attention == "virnuc",
        )?;
    }
    let engine_sha = sha256_file(&engine_onnx)?;
    let source_sha = meta.onnx_sha256.clone();
    write_engine_metadata(
        &source_files.metadata,
        &out.join("model.json"),
        &engine_sha,
        level,
    )?;
    copy_tokenizer(&source_files, &meta, out)?;
    if reexport_dir.exists() {
        std::fs::remove_dir_all(&reexport_dir).map_err(|e| io_err("remove", &reexport_dir, e))?;
    }

    // TensorRT options (profiles cover the largest candidate budget; the autotuned one is recorded).
    let budgets: Vec<usize> = match options.fixed_budget {
        Some(b) => vec![b],
        None if options.budgets.is_empty() => {
            autotune::default_budgets(ep != Ep::Cpu, &meta.attention)
        }
        None => {
            let mut b = options.budgets.clone();
            b.sort_unstable();
            b.dedup();
            b
        }
    };
    let tensorrt = if ep == Ep::TensorRt {
        let plan = TrtPlan {
            engine_dir: out.clone(),
            device_id: options.device_id,
            fp16: meta.precision == "fp16",
            budget: budgets.iter().copied().max().unwrap_or(16384),
            max_seqs: None,
            plugin_library: options.trt_plugin.clone(),
            ep_context: options.trt_ep_context,
            workspace_bytes: None,
        };
        let o = trt_config::tensorrt_options(&plan, &meta.attention)
            .map_err(|e| EngineError::Model(e.to_string()))?;
        let cache = out.join(trt_config::TRT_CACHE_DIR);
        std::fs::create_dir_all(&cache).map_err(|e| io_err("create", &cache, e))?;
        Some(TensorRtSetting {
            options: trt_config::relative_options(&o, out),
        })
    } else {
        None
    };

    let mut rows: Vec<AutotuneRow> = Vec::new();
    let mut budget = budgets[0];
    let mut graph = CudaGraphSetting::default();
    if options.fixed_budget.is_none() {
        rows = autotune_rows(options, ep, out, &budgets, log)?;
        budget = autotune::choose_budget(&rows, false).ok_or_else(|| {
            EngineError::Model(format!(
                "no candidate budget ran on this device:\n{}",
                autotune::format_table(&rows)
            ))
        })?;
        if ep == Ep::Cuda && options.cuda_graph != CudaGraphMode::Off {
            rows.extend(crate::cuda_graph::autotune_graph_rows(
                options, out, &budgets, log,
            )?);
            let on = autotune::best_speed(&rows, true);
            let off = autotune::best_speed(&rows, false);
            let keep = match (options.cuda_graph, on, off) {
                (CudaGraphMode::On, Some(_), _) => true,
                (CudaGraphMode::Measure, Some(on), Some(off)) => {
                    on > off * (1.0 + autotune::NEAR_BEST)
                }
                _ => false,
            };
            if keep && let Some(b) = autotune::choose_budget(&rows, true) {
                budget = b;
                graph = CudaGraphSetting {
                    enabled: true,
                    max_seqs: Some(autotune::graph_max_seqs(b)),
                };
            }
        }
        log(&format!(
            "autotune (real tokens/s, chunk500-like packs):\n{}chosen budget: {budget}{}",
            autotune::format_table(&rows),
            if graph.enabled {
                " with CUDA graphs"
            } else {
                ""
            }
        ));
    }

    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        built_by: format!("virnuc-trt {}", env!("CARGO_PKG_VERSION")),
        built_at_unix: now_unix(),
        ep: ep.name().into(),
        device_index: options.device_id,
        device: host.device,
        ort_version: library.version.clone(),
        precision: meta.precision.clone(),
        attention: meta.attention.clone(),
        model_name: meta.model.name.clone(),
        optimization_level: level.name().into(),
        budget,
        autotune: rows,
        cuda_graph: graph,
        model_metadata_sha256: sha256_file(&out.join("model.json"))?,
        source: SourceModel {
            onnx: source_path_for_manifest(&files, &source_files, reexported_with.is_some()),
            onnx_sha256: source_sha,
            precision: meta.precision.clone(),
            reexported_with,
        },
        tensorrt,
    };
    manifest.write(out)?;
    log(&format!("wrote {}", out.join(MANIFEST_FILE).display()));
    Ok(BuildOutcome {
        dir: out.clone(),
        manifest,
    })
}

fn source_path_for_manifest(given: &ModelFiles, used: &ModelFiles, reexported: bool) -> String {
    if reexported {
        format!("re-export of {}", given.onnx.display())
    } else {
        used.onnx.display().to_string()
    }
}

/// `model.json` of the engine: the export's metadata as is (unknown fields kept), with the sha256 of
/// the engine graph and a note of the optimization.
fn write_engine_metadata(src: &Path, dst: &Path, onnx_sha256: &str, level: OptLevel) -> Result<()> {
    let text = std::fs::read_to_string(src).map_err(|e| io_err("read", src, e))?;
    let mut value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| EngineError::Model(format!("{}: {e}", src.display())))?;
    let obj = value
        .as_object_mut()
        .ok_or_else(|| EngineError::Model(format!("{}: not a JSON object", src.display())))?;
    let source_sha = obj.get("onnx_sha256").cloned();
    obj.insert("onnx_sha256".into(), onnx_sha256.into());
    obj.insert(
        "engine".into(),
        serde_json::json!({
            "built_by": format!("virnuc-trt {}", env!("CARGO_PKG_VERSION")),
            "optimization_level": level.name(),
            "source_onnx_sha256": source_sha,
        }),
    );
    let text = serde_json::to_string_pretty(&value)
        .map_err(|e| EngineError::Model(format!("cannot serialize metadata: {e}")))?;
    std::fs::write(dst, text + "\n").map_err(|e| io_err("write", dst, e))
}

/// Times every candidate budget on the engine folder (CUDA graphs off). A budget that fails (out of
/// memory) is recorded with its error and the larger ones are skipped.
fn autotune_rows(
    options: &BuildOptions,
    ep: Ep,
    out: &Path,
    budgets: &[usize],
    log: &mut dyn FnMut(&str),
) -> Result<Vec<AutotuneRow>> {
    let mut engine_options = EngineOptions::new(out, ep);
    engine_options.ort_lib = options.ort_lib.clone();
    engine_options.device_id = options.device_id;
    engine_options.intra_threads = options.intra_threads;
    engine_options.kernel_dir = options.kernel_dir.clone();
    if ep == Ep::TensorRt {
        engine_options.trt_cache_dir = Some(out.join(trt_config::TRT_CACHE_DIR));
    }
    let mut engine = open_engine(&engine_options)?;
    let gpu = ep != Ep::Cpu;
    let mut rows = Vec::new();
    let mut failed = false;
    for &budget in budgets {
        if failed {
            rows.push(AutotuneRow {
                budget,
                cuda_graph: false,
                tokens_per_s: None,
                packs: 0,
                seconds: 0.0,
                gpu_memory_used_mib: None,
                error: Some("skipped: a smaller budget failed".into()),
            });
            continue;
        }
        let packs = autotune::synthetic_packs(budget, 8, budget as u64, None, false);
        let result = autotune::measure(engine.as_mut(), &packs, options.autotune_seconds, 3);
        let memory = gpu
            .then(|| crate::manifest::gpu_memory_used_mib(options.device_id))
            .flatten();
        let row = match result {
            Ok((speed, n, secs)) => AutotuneRow {
                budget,
                cuda_graph: false,
                tokens_per_s: Some(speed),
                packs: n,
                seconds: secs,
                gpu_memory_used_mib: memory,
                error: None,
            },
            Err(e) => {
                failed = true;
                AutotuneRow {
                    budget,
                    cuda_graph: false,
                    tokens_per_s: None,
                    packs: 0,
                    seconds: 0.0,
                    gpu_memory_used_mib: memory,
                    error: Some(e.to_string()),
                }
            }
        };
        log(&format!(
            "  budget {budget}: {}",
            row.tokens_per_s.map_or_else(
                || row.error.clone().unwrap_or_default(),
                |s| format!("{s:.0} tokens/s")
            )
        ));
        rows.push(row);
    }
    Ok(rows)
}

/// What `embed --engine DIR` and `gate` call: reads the manifest, checks it against this host
/// (unless `force`), and returns the engine options to open it with plus the tuned budget.
#[derive(Debug, Clone)]
pub struct CheckedEngine {
    pub manifest: Manifest,
    /// Options for [`crate::open_engine`] (model = the engine folder, its EP and device).
    pub options: EngineOptions,
    /// The tuned `--toks-per-batch`.
    pub budget: usize,
    /// Set when `force` let a mismatch through (print it).
    pub forced_mismatch: Option<String>,
}

/// Opens an engine folder's manifest and checks the host. `device_id` overrides the build's device
/// index (the device model is what is compared).
pub fn check_engine_dir(
    dir: &Path,
    ort_lib: Option<&Path>,
    device_id: Option<i32>,
    force: bool,
) -> Result<CheckedEngine> {
    let manifest = Manifest::read(dir)?;
    let ep: Ep = manifest.ep.parse().map_err(|e: String| {
        EngineError::Model(format!("{}: {e}", dir.join(MANIFEST_FILE).display()))
    })?;
    let device = device_id.unwrap_or(manifest.device_index);
    let library = runtime::init(ort_lib)?;
    let mut forced_mismatch = None;
    match probe_host(ep, device, &library.version) {
        Ok(host) => {
            if let Err(m) = crate::manifest::check_manifest(&manifest, &host) {
                let msg = format!("engine {}: {m}", dir.display());
                if !force {
                    return Err(EngineError::Model(msg));
                }
                forced_mismatch = Some(msg);
            }
        }
        Err(e) if force => forced_mismatch = Some(format!("engine {}: {e}", dir.display())),
        Err(e) => {
            return Err(EngineError::Model(format!(
                "engine {}: cannot check the host against its manifest: {e} (--force skips the check)",
                dir.display()
            )));
        }
    }
    let actual = sha256_file(&dir.join("model.json"))?;
    if actual != manifest.model_metadata_sha256 {
        let msg = format!(
            "engine {}: model.json does not match the manifest (sha256 {actual}, manifest says {}): \
             files from different builds",
            dir.display(),
            manifest.model_metadata_sha256
        );
        if !force {
            return Err(EngineError::Model(msg));
        }
        forced_mismatch.get_or_insert(msg);
    }
    let mut options = EngineOptions::new(dir, ep);
    options.ort_lib = ort_lib.map(Path::to_path_buf);
    options.device_id = device;
    if ep == Ep::TensorRt {
        options.trt_cache_dir = Some(dir.join(trt_config::TRT_CACHE_DIR));
    }
    Ok(CheckedEngine {
        budget: manifest.budget,
        manifest,
        options,
        forced_mismatch,
    })
}

/// The tuned token budget of an engine folder (no host check): `embed --engine DIR`'s default
/// `--toks-per-batch`.
pub fn engine_default_budget(dir: &Path) -> Result<usize> {
    Ok(Manifest::read(dir)?.budget)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virnuc_core::{
        ModelConfig, ModelFamily, ModelSource, Pooling, TensorSpec, TokenizerSpec, alphabet,
    };

    fn meta(kind: &str, path: Option<&str>, seed: Option<u64>) -> ModelMetadata {
        let yaml = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/esm2_t6_8M.yaml"),
        )
        .expect("model yaml");
        let spec = |n: &str| TensorSpec {
            name: n.into(),
            dtype: "float32".into(),
            shape: vec![],
        };
        ModelMetadata {
            format: "virnuc-trt-onnx/1".into(),
            family: ModelFamily::Esm2,
            model: ModelConfig::from_yaml_str(&yaml).expect("valid"),
            tokenizer: TokenizerSpec::Esm2Alphabet,
            alphabet: alphabet::TOKENS.iter().map(|s| s.to_string()).collect(),
            pooling: Pooling::MeanResidues,
            attention: "ort".into(),
            fused: true,
            precision: "fp32".into(),
            repr_layer: 5,
            inputs: vec![],
            outputs: vec![spec("mean"), spec("hidden")],
            source: ModelSource {
                kind: kind.into(),
                path: path.map(str::to_string),
                sha256: None,
                seed,
            },
            random_weights: kind == "random",
            exporter_version: "0".into(),
            onnx_sha256: String::new(),
        }
    }

    #[test]
    fn reexport_reproduces_every_export_option() {
        let args = reexport_args(&meta("random", None, Some(7)), "fp16", Path::new("/o"))
            .expect("random source");
        assert_eq!(
            args.join(" "),
            "--random esm2_t6_8M --seed 7 --layers 6 --attention ort --fused --precision fp16 \
             --per-token --repr-layer 5 --out /o"
        );
        let args = reexport_args(&meta("hf", Some("/ck/esm2"), None), "fp32", Path::new("/o"))
            .expect("hf");
        assert_eq!(&args[..2], ["--hf", "/ck/esm2"]);
        let args = reexport_args(
            &meta("fair-esm", Some("/m.pt"), None),
            "fp16",
            Path::new("/o"),
        )
        .expect("fair-esm");
        assert_eq!(&args[..2], ["--fair-esm", "/m.pt"]);
        let e =
            reexport_args(&meta("hf", None, None), "fp16", Path::new("/o")).expect_err("no path");
        assert!(e.to_string().contains("export at fp16 yourself"), "{e}");
    }

    #[test]
    fn shell_words_quote_what_needs_it() {
        let w = shell_words(&[
            "python3".into(),
            "a b".into(),
            "it's".into(),
            "/x/y-1.onnx".into(),
        ]);
        assert_eq!(w, "python3 'a b' 'it'\\''s' /x/y-1.onnx");
    }

    #[test]
    fn option_parsers_name_the_choices() {
        assert_eq!("extended".parse::<OptLevel>(), Ok(OptLevel::Extended));
        assert!(
            "max"
                .parse::<OptLevel>()
                .expect_err("unknown")
                .contains("none, basic")
        );
        assert_eq!("auto".parse::<CudaGraphMode>(), Ok(CudaGraphMode::Measure));
        assert!("yes".parse::<CudaGraphMode>().is_err());
    }
}
