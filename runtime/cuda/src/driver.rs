//! Loading the kernel fatbin through the CUDA driver API (libcuda opened at run time) and
//! launching it on a caller's stream. Every unsafe driver call of the crate is in this file.

use std::collections::HashMap;
use std::ffi::{CString, c_void};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cudarc::driver::{result, sys};

use crate::CudaError;
use crate::geometry::{AlibiSlopes, DType, HEAD_DIMS, Problem, kernel_name, launch_config};

/// File name of the artifact `plugins/varlen_attention/build.sh` writes.
pub const FATBIN_NAME: &str = "varlen_attention.fatbin";

/// Where `build.sh` puts the artifact, relative to the project root.
pub const DEFAULT_KERNEL_DIR: &str = "build/varlen_attention";

fn driver(what: &'static str) -> impl FnOnce(result::DriverError) -> CudaError {
    move |e| CudaError::Driver {
        what,
        message: format!("{e:?}"),
    }
}

/// Opens libcuda, or says why not (instead of cudarc's panic on a missing library).
pub fn ensure_driver() -> Result<(), CudaError> {
    // SAFETY: only tries to dlopen the driver library by its usual names.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::NoDriver)
    }
}

/// The kernel fatbin, read from disk once; its module is loaded lazily into each CUDA context
/// that launches it (a module belongs to one context; ONNX Runtime's CUDA EP runs in the device's
/// primary context, TensorRT and tests may use others).
#[derive(Debug)]
pub struct VarlenKernels {
    path: PathBuf,
    image: Vec<u8>,
    // context pointer -> (module, function per kernel name)
    modules: Mutex<HashMap<usize, Loaded>>,
}

#[derive(Debug)]
struct Loaded {
    module: usize,
    functions: HashMap<String, usize>,
}

impl VarlenKernels {
    /// Reads `<kernel_dir>/varlen_attention.fatbin`. Fails with a message naming the build
    /// command when it has not been built. Needs neither a GPU nor libcuda.
    pub fn open(kernel_dir: &Path) -> Result<Self, CudaError> {
        let path = kernel_dir.join(FATBIN_NAME);
        let image = std::fs::read(&path).map_err(|source| CudaError::NotBuilt {
            path: path.clone(),
            source,
        })?;
        // A fatbin starts with its magic 0xBA55ED50 (little-endian); anything else is not ours.
        if image.len() < 16 || image[..4] != [0x50, 0xED, 0x55, 0xBA] {
            return Err(CudaError::Invalid(format!(
                "{} is not a CUDA fatbin",
                path.display()
            )));
        }
        Ok(Self {
            path,
            image,
            modules: Mutex::new(HashMap::new()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The function for `dtype`/`head_dim` (the ALiBi kernel with `alibi`) in the current context,
    /// loading the module first.
    fn function(
        &self,
        dtype: DType,
        head_dim: usize,
        alibi: bool,
    ) -> Result<sys::CUfunction, CudaError> {
        ensure_driver()?;
        let ctx = match result::ctx::get_current().map_err(driver("cuCtxGetCurrent"))? {
            Some(ctx) => ctx,
            None => return Err(CudaError::NoContext),
        };
        let mut modules = self
            .modules
            .lock()
            .map_err(|_| CudaError::Invalid("kernel cache poisoned".into()))?;
        let loaded = match modules.entry(ctx as usize) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                // SAFETY: `image` is a whole fatbin read from disk (magic checked in `open`) and
                // outlives the call; the driver copies what it needs.
                let module =
                    unsafe { result::module::load_data(self.image.as_ptr().cast::<c_void>()) }
                        .map_err(driver(
                            "cuModuleLoadData (varlen_attention.fatbin for this GPU)",
                        ))?;
                v.insert(Loaded {
                    module: module as usize,
                    functions: HashMap::new(),
                })
            }
        };
        let name = kernel_name(dtype, head_dim, alibi);
        if let Some(&f) = loaded.functions.get(&name) {
            return Ok(f as sys::CUfunction);
        }
        let cname = CString::new(name.clone()).map_err(|_| CudaError::Invalid(name.clone()))?;
        // SAFETY: the module was loaded above in this context and is never unloaded while `self`
        // lives (modules are released with the context).
        let f = unsafe { result::module::get_function(loaded.module as sys::CUmodule, cname) }
            .map_err(driver("cuModuleGetFunction"))?;
        loaded.functions.insert(name, f as usize);
        Ok(f)
    }

    /// Launches `com.virnuc:VarlenAttention` for `problem` on `stream` (asynchronous).
    ///
    /// # Safety
    /// In the CUDA context current on this thread, `stream` must be a valid stream (or null for the
    /// legacy default stream) and the pointers device memory that stays valid until the kernel has
    /// run: `qkv` `[total_tokens, 3·H·D]` and `out` `[total_tokens, H·D]` of `problem.dtype`,
    /// `cu_seqlens` `[batch + 1]` int32 holding valid cumulative lengths ending at
    /// `total_tokens`, and `position_ids` `[total_tokens]` int64 when `problem.rotary` (may be null
    /// otherwise; ALiBi never reads it). `out` must not overlap `qkv`.
    pub unsafe fn launch(
        &self,
        stream: *mut c_void,
        problem: &Problem,
        ptrs: &DevicePointers,
    ) -> Result<(), CudaError> {
        let Some(cfg) = launch_config(
            problem.total_tokens,
            problem.batch,
            problem.num_heads,
            problem.head_dim,
            problem.dtype,
        )?
        else {
            return Ok(());
        };
        if !HEAD_DIMS.contains(&problem.head_dim) {
            return Err(CudaError::Invalid(format!(
                "head_dim {} has no GPU kernel (16, 24, 32, 64, 128)",
                problem.head_dim
            )));
        }
        if ptrs.qkv == 0
            || ptrs.cu_seqlens == 0
            || ptrs.out == 0
            || (problem.rotary && ptrs.position_ids == 0)
        {
            return Err(CudaError::Invalid(
                "null device pointer for a required input or output".into(),
            ));
        }
        if problem.alibi.is_some() && problem.rotary {
            return Err(CudaError::Invalid(
                "rotary and ALiBi exclude each other".into(),
            ));
        }
        let f = self.function(problem.dtype, problem.head_dim, problem.alibi.is_some())?;
        let mut qkv = ptrs.qkv;
        let mut cu = ptrs.cu_seqlens;
        let mut pos = ptrs.position_ids;
        let mut out = ptrs.out;
        let mut total = problem.total_tokens as i32;
        let mut batch = problem.batch as i32;
        let mut heads = problem.num_heads as i32;
        let mut scale = problem.scale;
        let mut rotary = i32::from(problem.rotary);
        let mut base = problem.rotary_base;
        let mut alibi = problem.alibi.unwrap_or(AlibiSlopes::NONE);
        let mut params: [*mut c_void; 11] = [
            (&raw mut qkv).cast(),
            (&raw mut cu).cast(),
            (&raw mut pos).cast(),
            (&raw mut out).cast(),
            (&raw mut total).cast(),
            (&raw mut batch).cast(),
            (&raw mut heads).cast(),
            (&raw mut scale).cast(),
            (&raw mut rotary).cast(),
            (&raw mut base).cast(),
            (&raw mut alibi).cast(),
        ];
        // SAFETY: `f` comes from this context's module; the 11 parameters match the kernel's
        // signature (3 device pointers + 1 mutable, 3 int, float, int, float, and the #[repr(C)]
        // AlibiSlopes by value, laid out as the C++ struct) and live on this stack frame through
        // the call (the driver copies them); the caller vouches for the pointers and the stream
        // (see # Safety).
        unsafe {
            result::launch_kernel(
                f,
                cfg.grid,
                cfg.block,
                0,
                stream as sys::CUstream,
                &mut params,
            )
        }
        .map_err(driver("cuLaunchKernel (varlen attention)"))
    }
}

/// Device addresses of one call's tensors (`position_ids` may be 0 when rotary is off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevicePointers {
    pub qkv: u64,
    pub cu_seqlens: u64,
    pub position_ids: u64,
    pub out: u64,
}

/// The brief's one-call form: validates nothing beyond what [`Problem`] carries.
///
/// # Safety
/// See [`VarlenKernels::launch`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn launch_varlen_attention(
    kernels: &VarlenKernels,
    stream: *mut c_void,
    qkv_ptr: u64,
    cu_seqlens_ptr: u64,
    position_ids_ptr: u64,
    out_ptr: u64,
    total_tokens: usize,
    batch: usize,
    num_heads: usize,
    head_dim: usize,
    dtype: DType,
    scale: f32,
    rotary: bool,
    rotary_base: f32,
    alibi: Option<AlibiSlopes>,
) -> Result<(), CudaError> {
    let problem = Problem {
        total_tokens,
        batch,
        num_heads,
        head_dim,
        dtype,
        scale,
        rotary,
        rotary_base,
        alibi,
    };
    let ptrs = DevicePointers {
        qkv: qkv_ptr,
        cu_seqlens: cu_seqlens_ptr,
        position_ids: position_ids_ptr,
        out: out_ptr,
    };
    // SAFETY: forwarded contract.
    unsafe { kernels.launch(stream, &problem, &ptrs) }
}
