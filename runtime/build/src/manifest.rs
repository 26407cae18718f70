//! `manifest.json` of an engine folder: what the engine was built for (device, runtime, provider,
//! precision, tuned token budget) and the check that the host about to run it is the same.
//!
//! An engine folder is tied to one GPU model and one ONNX Runtime: the optimized graph may hold
//! provider-specific fused nodes, the tuned budget is a property of the card's memory and speed, and a
//! TensorRT engine cache is only valid for the GPU, driver, CUDA and TensorRT it was built with. So
//! `embed --engine DIR` and `gate` compare [`Manifest`] with [`HostFacts`] and refuse a mismatch
//! unless forced. The comparison is the pure function [`check_manifest`]; the probes
//! ([`HostFacts::probe`]) only gather facts (`nvidia-smi`, `/proc/cpuinfo`), so no GPU library is
//! linked.
//!
//! ```
//! use virnuc_build::manifest::{DeviceFacts, HostFacts, check_manifest, parse_nvidia_smi_csv};
//! let gpu = parse_nvidia_smi_csv("NVIDIA H200, 9.0, 580.159\n").unwrap();
//! let host = HostFacts { device: gpu.clone(), ort_version: "1.31.1".into() };
//! let mut manifest = virnuc_build::manifest::Manifest::example(gpu, "1.31.1");
//! assert!(check_manifest(&manifest, &host).is_ok());
//! manifest.device.name = "NVIDIA A100-SXM4-80GB".into();
//! let refusal = check_manifest(&manifest, &host).unwrap_err();
//! assert!(refusal.to_string().contains("NVIDIA A100-SXM4-80GB"));
//! ```

use std::fmt;
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use virnuc_engine::{EngineError, Result};

/// The manifest format this runtime writes and reads.
pub const MANIFEST_FORMAT: &str = "virnuc-trt-engine/1";
/// File name of the manifest inside an engine folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// What kind of device an engine runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Gpu,
    Cpu,
}

/// Identity of the device an engine was built on (or the host's device about to run it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceFacts {
    pub kind: DeviceKind,
    /// `nvidia-smi` name (`NVIDIA H200`) or the CPU model name (`/proc/cpuinfo`).
    pub name: String,
    /// GPU compute capability, e.g. `9.0`.
    pub compute_capability: Option<String>,
    /// NVIDIA driver version, e.g. `580.159`.
    pub driver: Option<String>,
    /// Highest CUDA version the driver supports (`nvidia-smi` header), e.g. `13.0`.
    pub cuda: Option<String>,
}

/// One measured token budget of the autotune.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutotuneRow {
    pub budget: usize,
    /// CUDA graph capture on for this measurement.
    pub cuda_graph: bool,
    /// Real (unpadded) tokens per second; `None` when the budget failed (e.g. out of memory).
    pub tokens_per_s: Option<f64>,
    pub packs: usize,
    pub seconds: f64,
    /// GPU memory in use after the measurement, MiB (`nvidia-smi`), when known.
    pub gpu_memory_used_mib: Option<u64>,
    /// Why the budget failed.
    pub error: Option<String>,
}

/// CUDA graph capture setting (CUDA EP only): needs every run the same shape, so packs are padded to
/// exactly `budget` tokens and `max_seqs` sequences.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CudaGraphSetting {
    pub enabled: bool,
    /// Sequences per padded pack (the `cu_seqlens` length is `max_seqs + 1`).
    pub max_seqs: Option<usize>,
}

/// The model the engine was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceModel {
    /// The `.onnx` given to `build` (or the one re-exported at another precision).
    pub onnx: String,
    pub onnx_sha256: String,
    pub precision: String,
    /// The exporter command that produced the graph when `build` re-exported it.
    pub reexported_with: Option<String>,
}

/// TensorRT settings recorded for an engine built for the TensorRT EP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorRtSetting {
    /// Every `trt_*` provider option, as passed to ONNX Runtime (paths relative to the engine folder).
    pub options: Vec<(String, String)>,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: String,
    /// `virnuc-trt x.y.z`.
    pub built_by: String,
    /// Seconds since the Unix epoch.
    pub built_at_unix: u64,
    /// `cpu`, `cuda` or `tensorrt`.
    pub ep: String,
    /// Device index on the build host (informational: the check compares the device model).
    pub device_index: i32,
    pub device: DeviceFacts,
    pub ort_version: String,
    /// `fp32` or `fp16`.
    pub precision: String,
    /// `virnuc`, `ort` or `masked`.
    pub attention: String,
    pub model_name: String,
    /// ONNX Runtime graph optimization level applied offline (`extended`, `all`, …).
    pub optimization_level: String,
    /// Tuned token budget: the default `--toks-per-batch` of `embed --engine DIR`.
    pub budget: usize,
    pub autotune: Vec<AutotuneRow>,
    pub cuda_graph: CudaGraphSetting,
    /// sha256 of the engine's `model.json` (which names the engine graph's own sha256).
    pub model_metadata_sha256: String,
    pub source: SourceModel,
    pub tensorrt: Option<TensorRtSetting>,
}

impl Manifest {
    /// A filled-in manifest for examples and tests.
    pub fn example(device: DeviceFacts, ort_version: &str) -> Self {
        let ep = match device.kind {
            DeviceKind::Gpu => "cuda",
            DeviceKind::Cpu => "cpu",
        };
        Self {
            format: MANIFEST_FORMAT.into(),
            built_by: format!("virnuc-trt {}", env!("CARGO_PKG_VERSION")),
            built_at_unix: 0,
            ep: ep.into(),
            device_index: 0,
            device,
            ort_version: ort_version.into(),
            precision: "fp16".into(),
            attention: "ort".into(),
            model_name: "esm2_t6_8M".into(),
            optimization_level: "extended".into(),
            budget: 16384,
            autotune: Vec::new(),
            cuda_graph: CudaGraphSetting::default(),
            model_metadata_sha256: String::new(),
            source: SourceModel {
                onnx: "model.onnx".into(),
                onnx_sha256: String::new(),
                precision: "fp16".into(),
                reexported_with: None,
            },
            tensorrt: None,
        }
    }

    /// Reads `DIR/manifest.json`, with a clear error when it is missing or not a manifest.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            EngineError::Model(format!(
                "{} is not an engine folder: cannot read {}: {e} (engine folders are made by `virnuc-trt build`)",
                dir.display(),
                path.display()
            ))
        })?;
        let manifest: Self = serde_json::from_str(&text).map_err(|e| {
            EngineError::Model(format!(
                "{}: not a valid engine manifest: {e}",
                path.display()
            ))
        })?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(EngineError::Model(format!(
                "{}: format `{}`, this runtime reads `{MANIFEST_FORMAT}` (rebuild the engine)",
                path.display(),
                manifest.format
            )));
        }
        Ok(manifest)
    }

    /// Writes `DIR/manifest.json` (pretty, newline-terminated) atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let tmp = dir.join(".manifest.json.tmp");
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| EngineError::Model(format!("cannot serialize the manifest: {e}")))?;
        std::fs::write(&tmp, text + "\n")
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| EngineError::Model(format!("cannot write {}: {e}", path.display())))
    }
}

/// What the host about to run an engine has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    pub device: DeviceFacts,
    pub ort_version: String,
}

impl HostFacts {
    /// Probes the device the engine would run on: the GPU `device_index` through `nvidia-smi` for a
    /// GPU provider, the CPU model otherwise. `ort_version` comes from the loaded library.
    pub fn probe(kind: DeviceKind, device_index: i32, ort_version: &str) -> Result<Self> {
        let device = match kind {
            DeviceKind::Gpu => probe_gpu(device_index)?,
            DeviceKind::Cpu => probe_cpu(),
        };
        Ok(Self {
            device,
            ort_version: ort_version.to_string(),
        })
    }
}

/// The device kind an execution provider runs on.
pub fn device_kind_of_ep(ep: &str) -> DeviceKind {
    if ep == "cpu" {
        DeviceKind::Cpu
    } else {
        DeviceKind::Gpu
    }
}

/// One difference between the engine's manifest and the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub what: &'static str,
    pub engine: String,
    pub host: String,
}

/// The engine was built for another device or runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub ep: String,
    pub differences: Vec<Difference>,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the engine was built for another ")?;
        let runtime_only = self
            .differences
            .iter()
            .all(|d| d.what == "ONNX Runtime version");
        f.write_str(if runtime_only { "runtime" } else { "device" })?;
        f.write_str(": ")?;
        for (i, d) in self.differences.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(
                f,
                "{} is `{}` in the engine, `{}` on this host",
                d.what, d.engine, d.host
            )?;
        }
        write!(
            f,
            ". Rebuild it here with `virnuc-trt build … --ep {}` (a tuned budget, an optimized graph or a \
             TensorRT engine from another device can be slow or wrong), or pass --force to run it anyway",
            self.ep
        )
    }
}

impl std::error::Error for Mismatch {}

/// Compares what the engine was built for with what the host has.
///
/// Always compared: device kind, device model name, compute capability and the ONNX Runtime version
/// (the optimized graph may hold fused nodes of that version). For TensorRT engines the driver and
/// CUDA version too: TensorRT engine caches are only valid with the CUDA stack they were built with.
pub fn check_manifest(manifest: &Manifest, host: &HostFacts) -> std::result::Result<(), Mismatch> {
    let mut differences = Vec::new();
    let mut differ = |what: &'static str, engine: &str, host: &str| {
        if engine.trim() != host.trim() {
            differences.push(Difference {
                what,
                engine: engine.to_string(),
                host: host.to_string(),
            });
        }
    };
    let kind = |k: DeviceKind| match k {
        DeviceKind::Gpu => "gpu",
        DeviceKind::Cpu => "cpu",
    };
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "unknown".into());
    let (e, h) = (&manifest.device, &host.device);
    differ("device kind", kind(e.kind), kind(h.kind));
    let label = if e.kind == DeviceKind::Gpu {
        "GPU"
    } else {
        "CPU"
    };
    differ(label, &e.name, &h.name);
    if e.kind == DeviceKind::Gpu {
        differ(
            "compute capability",
            &opt(&e.compute_capability),
            &opt(&h.compute_capability),
        );
    }
    differ(
        "ONNX Runtime version",
        &manifest.ort_version,
        &host.ort_version,
    );
    if manifest.ep == "tensorrt" {
        differ("NVIDIA driver", &opt(&e.driver), &opt(&h.driver));
        differ("CUDA version", &opt(&e.cuda), &opt(&h.cuda));
    }
    if differences.is_empty() {
        Ok(())
    } else {
        Err(Mismatch {
            ep: manifest.ep.clone(),
            differences,
        })
    }
}

/// Parses one line of `nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader`.
pub fn parse_nvidia_smi_csv(text: &str) -> std::result::Result<DeviceFacts, String> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .ok_or_else(|| "nvidia-smi printed nothing".to_string())?;
    let fields: Vec<&str> = line.split(',').map(str::trim).collect();
    match fields.as_slice() {
        [name, cc, driver] if !name.is_empty() => Ok(DeviceFacts {
            kind: DeviceKind::Gpu,
            name: (*name).to_string(),
            compute_capability: Some((*cc).to_string()),
            driver: Some((*driver).to_string()),
            cuda: None,
        }),
        _ => Err(format!(
            "unexpected nvidia-smi output `{line}` (expected `name, compute_cap, driver_version`)"
        )),
    }
}

/// The `CUDA Version: 13.0` of `nvidia-smi`'s banner.
pub fn parse_cuda_version(banner: &str) -> Option<String> {
    let rest = &banner[banner.find("CUDA Version:")? + "CUDA Version:".len()..];
    let v: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    (!v.is_empty()).then_some(v)
}

/// `model name : …` of `/proc/cpuinfo`.
pub fn parse_cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "model name").then(|| v.trim().to_string())
    })
}

fn nvidia_smi(args: &[&str]) -> Result<String> {
    let out = Command::new("nvidia-smi")
        .args(args)
        .output()
        .map_err(|e| EngineError::Provider {
            ep: "cuda",
            reason: format!(
                "cannot run nvidia-smi ({e}): the GPU cannot be identified for the engine manifest \
                 (is the NVIDIA driver installed and nvidia-smi on PATH?)"
            ),
        })?;
    if !out.status.success() {
        return Err(EngineError::Provider {
            ep: "cuda",
            reason: format!(
                "nvidia-smi {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// GPU `index` as `nvidia-smi` sees it.
pub fn probe_gpu(index: i32) -> Result<DeviceFacts> {
    let id = index.to_string();
    let csv = nvidia_smi(&[
        "-i",
        &id,
        "--query-gpu=name,compute_cap,driver_version",
        "--format=csv,noheader",
    ])?;
    let mut facts = parse_nvidia_smi_csv(&csv)
        .map_err(|reason| EngineError::Provider { ep: "cuda", reason })?;
    facts.cuda = nvidia_smi(&[]).ok().and_then(|b| parse_cuda_version(&b));
    Ok(facts)
}

/// GPU memory in use on `index`, MiB (`None` when nvidia-smi cannot tell).
pub fn gpu_memory_used_mib(index: i32) -> Option<u64> {
    let id = index.to_string();
    nvidia_smi(&[
        "-i",
        &id,
        "--query-gpu=memory.used",
        "--format=csv,noheader,nounits",
    ])
    .ok()?
    .trim()
    .parse()
    .ok()
}

/// This machine's CPU model.
pub fn probe_cpu() -> DeviceFacts {
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| parse_cpu_model(&t))
        .unwrap_or_else(|| format!("{} CPU", std::env::consts::ARCH));
    DeviceFacts {
        kind: DeviceKind::Cpu,
        name,
        compute_capability: None,
        driver: None,
        cuda: None,
    }
}
