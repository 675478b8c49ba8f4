//! Host memory for kernel arguments: a growable run of floats whose first element lies on
//! a 64-byte boundary (a cache line, and one AVX-512 vector). The runtime's arena and the
//! CPU backend's private memory are such buffers, and both place each argument at an
//! offset that is a multiple of 16 floats, so every argument starts on a cache line. A
//! `Vec<f32>` is only 16-byte aligned: its arguments then started 16 bytes into a line,
//! every 64-byte load or store of the `gemm` crate's micro-kernels straddled two lines, and
//! the product of cifar_cnn's second conv (32 × 1024 over 288) ran 15–25% slower.

use std::collections::TryReserveError;
use std::ops::{Deref, DerefMut};

/// The alignment of an [`AlignedBuf`]'s first element, in bytes.
pub const ALIGN_BYTES: usize = 64;

/// The alignment in floats: arguments placed at multiples of it stay aligned.
pub const ALIGN_FLOATS: usize = ALIGN_BYTES / std::mem::size_of::<f32>();

/// Floats on a 64-byte boundary, readable and writable as a slice (`Deref`).
#[derive(Debug, Default)]
pub struct AlignedBuf {
    /// The allocation: `base` floats of padding (none while empty), then the buffer.
    data: Vec<f32>,
    base: usize,
}

impl AlignedBuf {
    /// An empty buffer (no allocation).
    pub const fn new() -> AlignedBuf {
        AlignedBuf { data: Vec::new(), base: 0 }
    }

    /// Grows the buffer to `len` floats, the new ones set to `fill`, keeping its contents
    /// (a larger buffer is a new allocation, aligned in turn); a shorter `len` does
    /// nothing. Fails, leaving the buffer as it was, when the memory cannot be had.
    pub fn grow(&mut self, len: usize, fill: f32) -> Result<(), TryReserveError> {
        let old = self.len();
        if len <= old {
            return Ok(());
        }
        let mut data: Vec<f32> = Vec::new();
        data.try_reserve_exact(len + ALIGN_FLOATS - 1)?;
        // At most ALIGN_FLOATS - 1, so the allocation holds `len` floats after it (were
        // `align_offset` ever to decline, `usize::MAX`, the buffer would be merely unaligned).
        let base = data.as_ptr().align_offset(ALIGN_BYTES).min(ALIGN_FLOATS - 1);
        data.resize(base, 0.0);
        data.extend_from_slice(self);
        data.resize(base + len, fill);
        *self = AlignedBuf { data, base };
        Ok(())
    }

    /// [`Self::grow`] that aborts the process when the memory cannot be had, as a `Vec`
    /// does (the CPU backend's own scratch memory, which has no error path).
    pub fn grow_or_abort(&mut self, len: usize, fill: f32) {
        if self.grow(len, fill).is_err() {
            let layout =
                std::alloc::Layout::array::<f32>(len + ALIGN_FLOATS).unwrap_or(std::alloc::Layout::new::<f32>());
            std::alloc::handle_alloc_error(layout);
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.data[self.base..]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data[self.base..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grown_buffer_starts_on_a_cache_line_and_keeps_its_contents() {
        let mut b = AlignedBuf::new();
        assert!(b.is_empty());
        b.grow(5, 1.0).expect("memory");
        assert_eq!(&b[..], &[1.0; 5]);
        b[2] = 7.0;
        // Growing again (several sizes, so that some allocations come back unaligned): the
        // old floats stay, the new ones are the fill.
        let mut before = 5;
        for (len, fill) in [(6, -1.0), (100, -2.0), (1000, -3.0), (4097, -4.0), (1 << 16, -5.0)] {
            b.grow(len, fill).expect("memory");
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % ALIGN_BYTES, 0, "len {len}");
            assert_eq!(&b[..5], &[1.0, 1.0, 7.0, 1.0, 1.0]);
            assert!(b[before..].iter().all(|&x| x == fill), "len {len}");
            before = len;
        }
        assert_eq!((b[5], b[6], b[100], b[1000], b[4097]), (-1.0, -2.0, -3.0, -4.0, -5.0));
        // A shorter length keeps the buffer as it is.
        b.grow(3, 0.0).expect("memory");
        assert_eq!(b.len(), 1 << 16);
    }
}
