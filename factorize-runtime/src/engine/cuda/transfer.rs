//! Host ⇄ device copies: pinned staging buffers for uploads, a reused pinned buffer for
//! downloads, and a second stream that uploads the next layer while one is solved.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DriverError, PinnedHostSlice};
use rayon::prelude::*;

use super::{Gpu, GpuError};
use crate::engine::{LowRank, WeightMatrix};

/// Values per pinned staging buffer (32 MiB).
pub(super) const STAGING_CHUNK: usize = 1 << 22;

/// Host-to-device copies of large blocks go through two pinned buffers: the host fills one (on
/// all cores) while the other is copied, at about twice the rate of the driver's own staging of
/// pageable memory.
pub(super) enum Staging {
    /// Not needed yet.
    Unallocated,
    Ready([PinnedHostSlice<f64>; 2]),
    /// Pinning failed (e.g. a locked-memory limit): plain copies.
    Unavailable,
}

/// `src` on the device, copied on `stream`: blocks of at least two staging buffers go through
/// them (allocated on first use; plain copies when pinning fails).
pub(super) fn upload_on(
    stream: &Arc<CudaStream>,
    staging: &mut Staging,
    src: &[f64],
) -> Result<CudaSlice<f64>, GpuError> {
    let mut dst = stream.alloc_zeros::<f64>(src.len())?;
    if src.len() < 2 * STAGING_CHUNK {
        stream.memcpy_htod(src, &mut dst)?;
        return Ok(dst);
    }
    if let Staging::Unallocated = staging {
        *staging = pinned_pair(stream.context()).unwrap_or(Staging::Unavailable);
    }
    let Staging::Ready(buffers) = staging else {
        stream.memcpy_htod(src, &mut dst)?;
        return Ok(dst);
    };
    let chunks = src.chunks_exact(STAGING_CHUNK);
    let tail = chunks.remainder();
    for (k, chunk) in chunks.enumerate() {
        let buffer = &mut buffers[k % 2];
        // Waits until the buffer's previous copy has left it.
        let host = buffer.as_mut_slice()?;
        host.par_chunks_mut(1 << 15)
            .zip(chunk.par_chunks(1 << 15))
            .for_each(|(to, from)| to.copy_from_slice(from));
        let start = k * STAGING_CHUNK;
        stream.memcpy_htod(&*buffer, &mut dst.slice_mut(start..start + STAGING_CHUNK))?;
    }
    if !tail.is_empty() {
        let start = src.len() - tail.len();
        stream.memcpy_htod(tail, &mut dst.slice_mut(start..))?;
    }
    Ok(dst)
}

pub(super) fn pinned_pair(ctx: &Arc<CudaContext>) -> Result<Staging, DriverError> {
    // Write-combined: the host only writes these, and the copies to the device read them fast.
    let flags = cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED;
    Ok(Staging::Ready([
        zeroed_pinned(ctx, flags)?,
        zeroed_pinned(ctx, flags)?,
    ]))
}

/// A pinned buffer of `STAGING_CHUNK` zeros, allocated with cudarc's `flags`.
pub(super) fn zeroed_pinned(
    ctx: &Arc<CudaContext>,
    flags: u32,
) -> Result<PinnedHostSlice<f64>, DriverError> {
    // SAFETY: the memory is zeroed through its pointer before any slice of it is formed.
    let mut buffer = unsafe { ctx.alloc_pinned_with_flags::<f64>(STAGING_CHUNK, flags) }?;
    let ptr = buffer.as_mut_ptr()?;
    // SAFETY: `ptr` is the start of the `STAGING_CHUNK` values just allocated, owned by `buffer`
    // and not yet shared.
    unsafe { std::ptr::write_bytes(ptr, 0, STAGING_CHUNK) };
    Ok(buffer)
}

impl Gpu {
    /// `src` on the host: copied into a pinned buffer, then out of it on all cores into fresh
    /// memory. Fresh pages fault in at their first write, one by one in the writing thread, which
    /// made the driver's own copy into a new `Vec` several times slower.
    pub(super) fn download(&self, src: &CudaSlice<f64>) -> Result<Vec<f64>, GpuError> {
        let mut slot = self.download.borrow_mut();
        if slot.is_none() {
            // Not write-combined (cudarc's default for pinned memory): the host reads it.
            *slot = zeroed_pinned(self.stream.context(), 0).ok();
        }
        let Some(pinned) = slot.as_mut() else {
            return Ok(self.stream.clone_dtoh(src)?);
        };
        let buffer = pinned.as_mut_slice()?;
        let mut out = Vec::with_capacity(src.len());
        for start in (0..src.len()).step_by(STAGING_CHUNK) {
            let len = STAGING_CHUNK.min(src.len() - start);
            let view = src.slice(start..start + len);
            {
                let (ptr, _guard) = view.device_ptr(&self.stream);
                // SAFETY: `buffer[..len]` is pinned host memory of exactly the view's length,
                // and the stream is synchronised before it is read or written again.
                unsafe {
                    cudarc::driver::result::memcpy_dtoh_async(
                        &mut buffer[..len],
                        ptr,
                        self.stream.cu_stream(),
                    )
                }?;
            }
            self.stream.synchronize()?;
            out.par_extend(buffer[..len].par_iter().copied());
        }
        Ok(out)
    }

    /// `src` on the device (see [`upload_on`]).
    pub(super) fn upload(&self, src: &[f64]) -> Result<CudaSlice<f64>, GpuError> {
        upload_on(&self.stream, &mut self.staging.borrow_mut(), src)
    }

    /// The stream that uploads the next layer while this one is solved (created on first use).
    pub(super) fn copy_stream(&self) -> Result<Arc<CudaStream>, GpuError> {
        if let Some(copy) = self.copy.get() {
            return Ok(copy.clone());
        }
        let copy = self.stream.context().new_stream()?;
        Ok(self.copy.get_or_init(|| copy).clone())
    }

    /// [`Self::low_rank`] for each `(weight, rank)`, with the time of each: layer `k + 1` is
    /// uploaded by another thread on the copy stream while layer `k` is solved. cudarc orders
    /// the two streams: its events make the compute stream wait for an upload it reads.
    pub(super) fn low_rank_many(
        &self,
        layers: &[(WeightMatrix<'_>, usize)],
    ) -> Vec<(Result<LowRank, GpuError>, Duration)> {
        if layers.is_empty() {
            return Vec::new();
        }
        let copy = match self.copy_stream() {
            Ok(copy) => copy,
            Err(_) => {
                return layers
                    .iter()
                    .map(|(w, rank)| {
                        let start = Instant::now();
                        (self.low_rank(w, *rank), start.elapsed())
                    })
                    .collect()
            }
        };
        let mut staging = Some(self.staging.replace(Staging::Unallocated));
        let mut out = Vec::with_capacity(layers.len());
        std::thread::scope(|scope| {
            let copy = &copy;
            let spawn = |k: usize, mut staging: Staging| {
                let data = layers[k].0.data();
                scope.spawn(move || (upload_on(copy, &mut staging, data), staging))
            };
            let mut pending = staging.take().map(|st| spawn(0, st));
            for (k, (w, rank)) in layers.iter().enumerate() {
                let start = Instant::now();
                let uploaded = match pending.take().map(|p| p.join()) {
                    Some(Ok((uploaded, back))) => {
                        staging = Some(back);
                        uploaded
                    }
                    _ => Err(GpuError::Failed("the upload thread panicked".into())),
                };
                if k + 1 < layers.len() {
                    pending = staging.take().map(|st| spawn(k + 1, st));
                }
                let solved = uploaded.and_then(|a| self.low_rank_uploaded(a, w, *rank));
                out.push((solved, start.elapsed()));
            }
        });
        *self.staging.borrow_mut() = staging.unwrap_or(Staging::Unallocated);
        out
    }
}
