//! TensorRT execution-provider configuration for an engine folder, as pure functions.
//!
//! TensorRT was not available where this was developed, so this logic is what can be tested here: which
//! `trt_*` options a packed ESM-2 graph needs, and that they cover the tuned token budget. Everything
//! lives in the engine folder, per GPU: the engine cache and timing cache (`DIR/trt/`), the EP-context
//! model (`DIR/model_ctx.onnx`, a graph that embeds or points to the built engine so that production
//! servers skip the minutes-long engine build), and the VarlenAttention plugin library path.
//!
//! Optimization profile: the graph has two dynamic dimensions, `T` (tokens: `input_ids`,
//! `position_ids`) and `B + 1` (`cu_seqlens`). TensorRT needs min/opt/max for each; max covers the
//! budget (`T = budget`, `B = max_seqs`), opt is the budget itself because the packer fills packs to it,
//! min is one shortest sequence (`<cls>` + 1 residue + `<eos>`).

use std::path::{Path, PathBuf};

/// Sub-folder of the engine folder holding TensorRT engine and timing caches.
pub const TRT_CACHE_DIR: &str = "trt";
/// EP-context model written next to `model.onnx`.
pub const EP_CONTEXT_MODEL: &str = "model_ctx.onnx";

/// What the TensorRT options depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrtPlan {
    pub engine_dir: PathBuf,
    pub device_id: i32,
    pub fp16: bool,
    /// Tokens per pack (the profile's opt and max `T`).
    pub budget: usize,
    /// Sequences per pack at most (the profile's max `B`); `None` = `budget / 3` (every sequence ≥ 3 tokens).
    pub max_seqs: Option<usize>,
    /// `libvirnuc_varlen_trt.so` (plugins/varlen_attention/tensorrt) when the graph has `virnuc` attention.
    pub plugin_library: Option<PathBuf>,
    /// Dump an EP-context model after the first build.
    pub ep_context: bool,
    /// TensorRT builder workspace, bytes (`None`: TensorRT's default, the device memory).
    pub workspace_bytes: Option<usize>,
}

/// Invalid plan (checked before anything is handed to ONNX Runtime).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrtConfigError {
    #[error("token budget {0} is too small: a pack holds at least one sequence of 3 tokens")]
    Budget(usize),
    #[error("max sequences per pack {max_seqs} cannot exceed budget / 3 = {limit}")]
    MaxSeqs { max_seqs: usize, limit: usize },
    #[error(
        "the graph uses com.virnuc:VarlenAttention: TensorRT needs the plugin library \
         (build plugins/varlen_attention/tensorrt, then pass --trt-plugin PATH/libvirnuc_varlen_trt.so)"
    )]
    PluginMissing,
    #[error("TensorRT plugin library {0} does not exist")]
    PluginNotFound(String),
}

/// min/opt/max shapes for the profile, in the `name:dims,name:dims` syntax of the TensorRT EP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileShapes {
    pub min: String,
    pub opt: String,
    pub max: String,
}

/// The profile covering packs of up to `budget` tokens and `max_seqs` sequences.
pub fn profile_shapes(budget: usize, max_seqs: usize) -> ProfileShapes {
    let shapes =
        |t: usize, b: usize| format!("input_ids:{t},position_ids:{t},cu_seqlens:{}", b + 1);
    // opt at the budget's typical sequence count for chunk500-like packs (~168 tokens each), but
    // never above max: TensorRT picks kernels for opt, and full packs are the steady state.
    let opt_seqs = (budget / 168).clamp(1, max_seqs);
    ProfileShapes {
        min: shapes(3, 1),
        opt: shapes(budget, opt_seqs),
        max: shapes(budget, max_seqs),
    }
}

/// Every `trt_*` option for `plan`, in the order they are applied. Paths are absolute.
pub fn tensorrt_options(
    plan: &TrtPlan,
    attention: &str,
) -> Result<Vec<(String, String)>, TrtConfigError> {
    if plan.budget < 3 {
        return Err(TrtConfigError::Budget(plan.budget));
    }
    let limit = plan.budget / 3;
    let max_seqs = plan.max_seqs.unwrap_or(limit);
    if max_seqs == 0 || max_seqs > limit {
        return Err(TrtConfigError::MaxSeqs { max_seqs, limit });
    }
    let cache = plan.engine_dir.join(TRT_CACHE_DIR);
    let cache = cache.display().to_string();
    let mut o: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: String| o.push((k.to_string(), v));
    set("device_id", plan.device_id.to_string());
    set("trt_fp16_enable", bool01(plan.fp16));
    // Layer norms in fp32 inside fp16 engines: their reductions overflow in fp16.
    set("trt_layer_norm_fp32_fallback", bool01(plan.fp16));
    set("trt_engine_cache_enable", "1".into());
    set("trt_engine_cache_path", cache.clone());
    set("trt_timing_cache_enable", "1".into());
    set("trt_timing_cache_path", cache);
    // Engines are only valid on the GPU model they were built on; the manifest check enforces it,
    // and hardware-compatible engines are slower.
    set("trt_engine_hw_compatible", "0".into());
    let shapes = profile_shapes(plan.budget, max_seqs);
    set("trt_profile_min_shapes", shapes.min);
    set("trt_profile_opt_shapes", shapes.opt);
    set("trt_profile_max_shapes", shapes.max);
    if let Some(bytes) = plan.workspace_bytes {
        set("trt_max_workspace_size", bytes.to_string());
    }
    match (&plan.plugin_library, attention) {
        (Some(lib), _) => {
            if !lib.is_file() {
                return Err(TrtConfigError::PluginNotFound(lib.display().to_string()));
            }
            set("trt_extra_plugin_lib_paths", lib.display().to_string());
        }
        (None, "virnuc") => return Err(TrtConfigError::PluginMissing),
        (None, _) => {}
    }
    if plan.ep_context {
        set("trt_dump_ep_context_model", "1".into());
        set(
            "trt_ep_context_file_path",
            plan.engine_dir.join(EP_CONTEXT_MODEL).display().to_string(),
        );
        // 0: the context node points to the engine file in the cache (keeps the .onnx small).
        set("trt_ep_context_embed_mode", "0".into());
    }
    Ok(o)
}

fn bool01(b: bool) -> String {
    if b { "1" } else { "0" }.to_string()
}

/// Rewrites absolute paths under `engine_dir` as relative ones (the manifest travels with the folder).
pub fn relative_options(options: &[(String, String)], engine_dir: &Path) -> Vec<(String, String)> {
    let prefix = engine_dir.display().to_string();
    options
        .iter()
        .map(|(k, v)| {
            let v = match v.strip_prefix(&prefix) {
                Some(rest) => format!(".{rest}"),
                None => v.clone(),
            };
            (k.clone(), v)
        })
        .collect()
}

/// Parses a profile string back into `(name, dims)` (for checks and tests).
pub fn parse_shapes(s: &str) -> Option<Vec<(String, usize)>> {
    s.split(',')
        .map(|part| {
            let (name, dim) = part.split_once(':')?;
            Some((name.to_string(), dim.parse().ok()?))
        })
        .collect()
}

/// The `ort` TensorRT provider configured with `options` (from [`tensorrt_options`]).
#[cfg(feature = "tensorrt")]
pub fn tensorrt_provider(options: &[(String, String)]) -> ort::ep::TensorRT {
    let mut trt = ort::ep::TensorRT::default();
    for (k, v) in options {
        let on = v == "1";
        trt = match k.as_str() {
            "device_id" => trt.with_device_id(v.parse().unwrap_or(0)),
            "trt_fp16_enable" => trt.with_fp16(on),
            "trt_layer_norm_fp32_fallback" => trt.with_layer_norm_fp32_fallback(on),
            "trt_engine_cache_enable" => trt.with_engine_cache(on),
            "trt_engine_cache_path" => trt.with_engine_cache_path(v),
            "trt_timing_cache_enable" => trt.with_timing_cache(on),
            "trt_timing_cache_path" => trt.with_timing_cache_path(v),
            "trt_engine_hw_compatible" => trt.with_engine_hw_compatible(on),
            "trt_profile_min_shapes" => trt.with_profile_min_shapes(v),
            "trt_profile_opt_shapes" => trt.with_profile_opt_shapes(v),
            "trt_profile_max_shapes" => trt.with_profile_max_shapes(v),
            "trt_max_workspace_size" => trt.with_max_workspace_size(v.parse().unwrap_or(0)),
            "trt_extra_plugin_lib_paths" => trt.with_extra_plugin_lib_paths(v),
            "trt_dump_ep_context_model" => trt.with_dump_ep_context_model(on),
            "trt_ep_context_file_path" => trt.with_ep_context_file_path(v),
            "trt_ep_context_embed_mode" => trt.with_ep_context_embed_mode(v.parse().unwrap_or(0)),
            _ => trt,
        };
    }
    trt
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(dir: &Path) -> TrtPlan {
        TrtPlan {
            engine_dir: dir.to_path_buf(),
            device_id: 1,
            fp16: true,
            budget: 16384,
            max_seqs: None,
            plugin_library: None,
            ep_context: true,
            workspace_bytes: None,
        }
    }

    fn get<'a>(o: &'a [(String, String)], k: &str) -> Option<&'a str> {
        o.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
    }

    #[test]
    fn caches_profiles_and_context_model_live_in_the_engine_folder() {
        let dir = Path::new("/engines/h200-650m");
        let o = tensorrt_options(&plan(dir), "ort").expect("valid");
        assert_eq!(get(&o, "device_id"), Some("1"));
        assert_eq!(get(&o, "trt_fp16_enable"), Some("1"));
        assert_eq!(get(&o, "trt_layer_norm_fp32_fallback"), Some("1"));
        assert_eq!(
            get(&o, "trt_engine_cache_path"),
            Some("/engines/h200-650m/trt")
        );
        assert_eq!(
            get(&o, "trt_timing_cache_path"),
            Some("/engines/h200-650m/trt")
        );
        assert_eq!(
            get(&o, "trt_ep_context_file_path"),
            Some("/engines/h200-650m/model_ctx.onnx")
        );
        assert_eq!(get(&o, "trt_extra_plugin_lib_paths"), None);
        let rel = relative_options(&o, dir);
        assert_eq!(get(&rel, "trt_engine_cache_path"), Some("./trt"));
    }

    #[test]
    fn fp32_plans_leave_fp16_off() {
        let mut p = plan(Path::new("/e"));
        p.fp16 = false;
        p.ep_context = false;
        let o = tensorrt_options(&p, "masked").expect("valid");
        assert_eq!(get(&o, "trt_fp16_enable"), Some("0"));
        assert_eq!(get(&o, "trt_dump_ep_context_model"), None);
    }

    #[test]
    fn virnuc_attention_needs_an_existing_plugin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = plan(dir.path());
        assert_eq!(
            tensorrt_options(&p, "virnuc"),
            Err(TrtConfigError::PluginMissing)
        );
        p.plugin_library = Some(dir.path().join("libvirnuc_varlen_trt.so"));
        assert!(matches!(
            tensorrt_options(&p, "virnuc"),
            Err(TrtConfigError::PluginNotFound(_))
        ));
        std::fs::write(dir.path().join("libvirnuc_varlen_trt.so"), b"").expect("write");
        let o = tensorrt_options(&p, "virnuc").expect("valid");
        assert!(
            get(&o, "trt_extra_plugin_lib_paths")
                .is_some_and(|v| v.ends_with("libvirnuc_varlen_trt.so"))
        );
    }

    #[test]
    fn bad_budgets_are_refused() {
        let mut p = plan(Path::new("/e"));
        p.budget = 2;
        assert_eq!(tensorrt_options(&p, "ort"), Err(TrtConfigError::Budget(2)));
        p.budget = 300;
        p.max_seqs = Some(101);
        assert!(matches!(
            tensorrt_options(&p, "ort"),
            Err(TrtConfigError::MaxSeqs { limit: 100, .. })
        ));
    }

    proptest::proptest! {
        /// The profile always covers the budget: min ≤ opt ≤ max in every dimension, max T is the
        /// budget, and T and position_ids agree.
        #[test]
        fn profile_covers_the_budget(budget in 3usize..200_000, frac in 0.0f64..1.0) {
            let limit = budget / 3;
            let max_seqs = ((limit as f64 * frac) as usize).clamp(1, limit);
            let s = profile_shapes(budget, max_seqs);
            let min = parse_shapes(&s.min).expect("min");
            let opt = parse_shapes(&s.opt).expect("opt");
            let max = parse_shapes(&s.max).expect("max");
            for ((a, b), c) in min.iter().zip(&opt).zip(&max) {
                proptest::prop_assert_eq!(&a.0, &b.0);
                proptest::prop_assert_eq!(&b.0, &c.0);
                proptest::prop_assert!(a.1 <= b.1 && b.1 <= c.1, "{:?} {:?} {:?}", a, b, c);
            }
            proptest::prop_assert_eq!(max[0].1, budget);
            proptest::prop_assert_eq!(max[1].1, budget);
            proptest::prop_assert_eq!(max[2].1, max_seqs + 1);
            proptest::prop_assert_eq!(min[2].1, 2);
        }
    }
}
