//! Device profiles: what the cost model knows about a machine. Built-in profiles for an
//! H100/H200-class GPU and for this project's 2-core x86 class; measured profiles are JSON
//! files of the same fields (`pdgc explain --device my.json`).

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceProfile {
    pub name: String,
    /// Peak f32 FLOP/s of the kernels pdgc emits (CUDA cores / SIMD lanes, no tensor cores).
    pub peak_flops: f64,
    /// Memory bandwidth, bytes/s.
    pub bandwidth: f64,
    /// Cost of one kernel launch (or one parallel dispatch on the CPU), seconds.
    pub launch_latency: f64,
    /// Memory available to one process, bytes.
    pub memory: u64,
    /// GEMM register/shared tile edge: a dimension is padded to a multiple of it.
    pub tile: usize,
    /// FLOPs of one GEMM at which it reaches half of peak (occupancy ramp).
    pub half_efficiency_flops: f64,
    /// The fraction of GEMM efficiency a fused sliding-window kernel (`direct`, `crb`)
    /// reaches: strided window reads vectorize poorly on CPUs.
    #[serde(default = "default_window_efficiency")]
    pub window_efficiency: f64,
    /// The fraction of GEMM efficiency ghost norm's Gram products over T positions reach:
    /// they are computed entry by entry in registers (no T×T buffer), reading the columns
    /// with a stride of T, which a CPU's caches and vectors serve poorly. Not measured on
    /// GPUs (1.0 there, as for profile files without it).
    #[serde(default = "default_gram_efficiency")]
    pub gram_efficiency: f64,
}

fn default_gram_efficiency() -> f64 {
    1.0
}

fn default_window_efficiency() -> f64 {
    0.85
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("unknown device profile `{name}`: use one of {builtin}, or a path to a profile JSON file")]
    Unknown { name: String, builtin: String },
    #[error("cannot read device profile {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("device profile {path} is not valid: {source}")]
    Parse { path: String, source: serde_json::Error },
    #[error("device profile {path}: `{field}` must be positive")]
    NonPositive { path: String, field: &'static str },
}

impl DeviceProfile {
    /// NVIDIA H200 (SXM): 67 TFLOP/s f32, 4.8 TB/s HBM3e, 141 GB.
    pub fn h200() -> DeviceProfile {
        DeviceProfile {
            name: "h200".into(),
            peak_flops: 67e12,
            bandwidth: 4.8e12,
            launch_latency: 4e-6,
            memory: 141_000_000_000,
            tile: 64,
            half_efficiency_flops: 2e8,
            window_efficiency: 0.85,
            gram_efficiency: 1.0,
        }
    }

    /// NVIDIA H100 (SXM): 67 TFLOP/s f32, 3.35 TB/s HBM3, 80 GB.
    pub fn h100() -> DeviceProfile {
        DeviceProfile {
            name: "h100".into(),
            peak_flops: 67e12,
            bandwidth: 3.35e12,
            launch_latency: 4e-6,
            memory: 80_000_000_000,
            tile: 64,
            half_efficiency_flops: 2e8,
            window_efficiency: 0.85,
            gram_efficiency: 1.0,
        }
    }

    /// The project's CI/developer machine class: 2 x86-64 cores with FMA, 128-bit vectors
    /// from Cranelift (F32X4), 24 GiB.
    pub fn cpu2() -> DeviceProfile {
        DeviceProfile {
            name: "cpu2".into(),
            peak_flops: 2.0 * 2.5e9 * 4.0 * 2.0 * 2.0,
            bandwidth: 15e9,
            launch_latency: 5e-6,
            memory: 24 * (1 << 30),
            tile: 8,
            half_efficiency_flops: 2e5,
            window_efficiency: 0.25,
            // Measured: VGG16's last three convs (T = 196, B = 16) ran their Gram products
            // at about 0.9 GFLOP/s on 2 threads, 1.2% of peak.
            gram_efficiency: 0.012,
        }
    }

    pub const BUILTIN: [&'static str; 3] = ["h200", "h100", "cpu2"];

    pub fn builtin(name: &str) -> Option<DeviceProfile> {
        match name {
            "h200" => Some(DeviceProfile::h200()),
            "h100" => Some(DeviceProfile::h100()),
            "cpu2" | "cpu" => Some(DeviceProfile::cpu2()),
            _ => None,
        }
    }

    /// A built-in name, or a path to a JSON profile.
    pub fn resolve(name_or_path: &str) -> Result<DeviceProfile, ProfileError> {
        if let Some(p) = DeviceProfile::builtin(name_or_path) {
            return Ok(p);
        }
        let path = Path::new(name_or_path);
        if !path.exists() && !name_or_path.ends_with(".json") {
            return Err(ProfileError::Unknown {
                name: name_or_path.to_string(),
                builtin: DeviceProfile::BUILTIN.join(", "),
            });
        }
        DeviceProfile::load(path)
    }

    pub fn load(path: &Path) -> Result<DeviceProfile, ProfileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Io { path: shown.clone(), source })?;
        let p: DeviceProfile =
            serde_json::from_str(&text).map_err(|source| ProfileError::Parse { path: shown.clone(), source })?;
        let checks: [(&'static str, bool); 6] = [
            ("peak_flops", p.peak_flops > 0.0),
            ("bandwidth", p.bandwidth > 0.0),
            ("launch_latency", p.launch_latency >= 0.0),
            ("memory", p.memory > 0),
            ("tile", p.tile > 0),
            ("half_efficiency_flops", p.half_efficiency_flops >= 0.0),
        ];
        if let Some((field, _)) = checks.iter().find(|(_, ok)| !ok) {
            return Err(ProfileError::NonPositive { path: shown, field });
        }
        Ok(p)
    }

    /// Fraction of peak a GEMM-shaped contraction reaches: tile padding waste along its
    /// three dims times an occupancy ramp in its total work.
    pub fn gemm_efficiency(&self, m: u64, n: u64, k: u64, flops: f64) -> f64 {
        let t = self.tile as u64;
        let util = |x: u64| {
            if x == 0 {
                1.0
            } else {
                x as f64 / (x.div_ceil(t) * t) as f64
            }
        };
        util(m) * util(n) * util(k).sqrt() * flops / (flops + self.half_efficiency_flops)
    }
}
