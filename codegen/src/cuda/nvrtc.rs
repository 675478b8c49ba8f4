//! NVRTC through cudarc: CUDA C → cubin (machine code for one architecture) or PTX.
//!
//! cudarc loads `libnvrtc` at run time (`dynamic-loading`) and panics if it is asked for a
//! symbol of a library it cannot find, so every entry point here first checks
//! [`available`], which only tries to open the library. A compile failure returns NVRTC's
//! log together with the generated source, numbered, so the line in the log can be found.

use std::ffi::{c_char, CString};

use cudarc::nvrtc::{result, sys};

use super::CudaError;

/// A target architecture: `sm_{0}` for cubins, `compute_{0}` for PTX (80 = A100,
/// 90 = H100/H200).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arch(pub u32);

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sm_{}", self.0)
    }
}

/// How hard NVRTC optimizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opt {
    /// NVRTC's defaults (-O3 in NVVM and ptxas): what a session runs.
    Full,
    /// `--Ofast-compile=max`: about 10x faster to compile, slower code. Every check NVRTC
    /// and ptxas make on the program still happens; for compile checks of many modules.
    FastCompile,
}

/// NVRTC's version, if the library can be loaded; otherwise why not.
pub fn available() -> Result<(i32, i32), CudaError> {
    // SAFETY: only tries to dlopen the candidate names; resolves no symbol.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaError::NvrtcMissing(format!(
            "libnvrtc was not found (tried {}); install NVRTC (e.g. `pip install nvidia-cuda-nvrtc-cu12==12.9.86`) \
             and put its lib folder on LD_LIBRARY_PATH",
            super::candidates("nvrtc")
        )));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; the out-pointers are valid.
    let status = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    status.result().map_err(|e| CudaError::Nvrtc(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

/// What to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    Cubin,
    Ptx,
}

/// Compiles `source` to a cubin for `arch`.
pub fn compile_cubin(source: &str, name: &str, arch: Arch, opt: Opt) -> Result<Vec<u8>, CudaError> {
    compile(source, name, arch, opt, Output::Cubin)
}

/// Compiles `source` to PTX text for `compute_{arch}`.
pub fn compile_ptx(source: &str, name: &str, arch: Arch, opt: Opt) -> Result<String, CudaError> {
    let bytes = compile(source, name, arch, opt, Output::Ptx)?;
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8(bytes[..end].to_vec())
        .map_err(|_| CudaError::Nvrtc("NVRTC returned PTX that is not UTF-8".into()))
}

fn compile(source: &str, name: &str, arch: Arch, opt: Opt, output: Output) -> Result<Vec<u8>, CudaError> {
    available()?;
    let src = CString::new(source).map_err(|_| CudaError::Nvrtc("the source contains a NUL byte".into()))?;
    let cname = CString::new(name).map_err(|_| CudaError::Nvrtc("the program name contains a NUL byte".into()))?;
    let prog = result::create_program(&src, Some(&cname)).map_err(|e| CudaError::Nvrtc(format!("create: {e:?}")))?;
    let target = match output {
        Output::Cubin => format!("--gpu-architecture=sm_{}", arch.0),
        Output::Ptx => format!("--gpu-architecture=compute_{}", arch.0),
    };
    let mut options = vec![target, "--std=c++17".to_string()];
    if opt == Opt::FastCompile {
        options.push("--Ofast-compile=max".to_string());
    }
    // SAFETY: `prog` is a live program; the options are NUL-free strings.
    let compiled = unsafe { result::compile_program(prog, &options) };
    // SAFETY: `prog` is live until destroyed below.
    let log = unsafe { result::get_program_log(prog) }.map(|l| c_chars_to_string(&l)).unwrap_or_default();
    let out = match compiled {
        Err(e) => Err(CudaError::Compile {
            arch: arch.to_string(),
            status: format!("{:?}", e.0),
            log: log.trim_end().to_string(),
            code: source.to_string(),
        }),
        // SAFETY: the program compiled; the buffers are sized by NVRTC's own size query.
        Ok(()) => unsafe {
            match output {
                Output::Cubin => get_cubin(prog),
                Output::Ptx => result::get_ptx(prog)
                    .map(|p| p.iter().map(|&c| c as u8).collect())
                    .map_err(|e| CudaError::Nvrtc(format!("get PTX: {e:?}"))),
            }
        },
    };
    // SAFETY: `prog` is live and destroyed once.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// # Safety
/// `prog` is a program compiled for a real architecture (`sm_XX`).
unsafe fn get_cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>, CudaError> {
    let mut size = 0usize;
    // SAFETY: per the function's contract.
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
        .result()
        .map_err(|e| CudaError::Nvrtc(format!("get cubin size: {e:?}")))?;
    let mut buf = vec![0 as c_char; size];
    // SAFETY: `buf` holds the `size` bytes NVRTC asked for.
    unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr()) }
        .result()
        .map_err(|e| CudaError::Nvrtc(format!("get cubin: {e:?}")))?;
    Ok(buf.into_iter().map(|c| c as u8).collect())
}

fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The source with line numbers, as a compile error shows it.
pub fn numbered(source: &str) -> String {
    source.lines().enumerate().map(|(i, l)| format!("{:5} | {l}\n", i + 1)).collect()
}
