//! The read-only index arrays and angles a lane copied to its device lately, kept by their
//! contents. A decode step gives every layer the same RoPE angles, the same cache slots to
//! write, the same block tables for the indexer and the same attention offsets (and, for dense
//! attention, the same keys): each is copied once a step instead of once a layer, which saves
//! the host a driver call and a staging copy each time.
//!
//! A MoE layer's lists differ from layer to layer; [`Pack`] puts them, of several types, in
//! one copy instead of one each. The routed experts' address tables, which a layer routed on
//! the device reads, differ between layers but not between steps: [`Tables`] keeps them all.
//!
//! While a lane captures a CUDA graph ([`UploadCounts::capturing`]), nothing is copied: an array
//! found here is handed out and held for the graph ([`UploadCounts::take_kept`]), since the graph
//! reads it at every launch; an array not found spoils the capture, and nothing new is kept.
//!
//! Only arrays that no kernel writes may come from here: a buffer is handed to every later
//! caller with the same contents, and freed (stream-ordered, by cudarc) once it is evicted and
//! no caller holds it. cudarc frees a buffer without making its context current, so whatever
//! this module drops (an evicted array, the cache itself, a [`Packed`]) binds it first, as the
//! backend's tensors do.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, DriverError};

/// The most arrays one [`Recent`] keeps.
const ENTRIES: usize = 16;
/// The most bytes one [`Recent`] keeps on the device (the KV cache's share leaves room for
/// them); an array of more than a quarter of this is copied each time and not kept.
pub(super) const BYTES: usize = 64 << 20;

/// An array's host values and its copy on the device.
type Held<T> = (Vec<T>, Arc<CudaSlice<T>>);

/// Recently uploaded arrays of one element type, most recent first.
pub(super) struct Recent<T> {
    held: Mutex<VecDeque<Held<T>>>,
}

impl<T> Default for Recent<T> {
    fn default() -> Self {
        Self {
            held: Mutex::new(VecDeque::new()),
        }
    }
}

/// What a lane's uploads did, for tests and the note's numbers.
#[derive(Debug, Default)]
pub(super) struct UploadCounts {
    /// Host-to-device copies of step data (weights at load time are not counted).
    pub copies: AtomicU64,
    /// Arrays answered by a buffer already on the device.
    pub reused: AtomicU64,
    /// Off: every array is copied (see `Cuda::reuse_uploads`).
    pub off: AtomicBool,
    /// Set while the lane's stream captures a graph (see `graphs`).
    pub capturing: AtomicBool,
    /// Set when a capture needed a copy to or from the host, which a graph cannot replay.
    pub spoiled: AtomicBool,
    /// Buffers a capture read from here, held for its graph.
    kept: Mutex<Vec<Arc<dyn Any + Send + Sync>>>,
}

impl UploadCounts {
    /// Whether a copy asked for now can go ahead: not while capturing, which it spoils.
    pub fn may_copy(&self) -> bool {
        let capturing = self.capturing.load(Ordering::Relaxed);
        if capturing {
            self.spoiled.store(true, Ordering::Relaxed);
        }
        !capturing
    }

    /// The buffers the capture now ending read from here.
    pub fn take_kept(&self) -> Vec<Arc<dyn Any + Send + Sync>> {
        std::mem::take(&mut *self.kept.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Holds `buf` for the graph being captured, if one is.
    fn keep_for_capture<T: Send + Sync + 'static>(&self, buf: &Arc<T>) {
        if self.capturing.load(Ordering::Relaxed) {
            let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            kept.push(buf.clone());
        }
    }
}

impl<T: bytemuck::Pod + DeviceRepr + Send + Sync> Recent<T> {
    /// A device buffer holding `v`: one already uploaded with the same bytes, or a new one from
    /// `upload`, kept for later callers.
    pub fn get(
        &self,
        v: &[T],
        counts: &UploadCounts,
        upload: impl FnOnce(&[T]) -> Result<CudaSlice<T>, DriverError>,
    ) -> Result<Arc<CudaSlice<T>>, DriverError> {
        let bytes = std::mem::size_of_val(v);
        let look = !counts.off.load(Ordering::Relaxed) && bytes <= BYTES / 4;
        let keep = look && !counts.capturing.load(Ordering::Relaxed);
        if look {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            // Bitwise, so that 0.0 and -0.0 (or two NaNs) are told apart as a copy would.
            let same = |h: &Vec<T>| {
                h.len() == v.len()
                    && bytemuck::cast_slice::<T, u8>(h) == bytemuck::cast_slice::<T, u8>(v)
            };
            if let Some(at) = held.iter().position(|(h, _)| same(h)) {
                let entry = held.remove(at).expect("the position found");
                let buf = entry.1.clone();
                held.push_front(entry);
                counts.reused.fetch_add(1, Ordering::Relaxed);
                counts.keep_for_capture(&buf);
                return Ok(buf);
            }
        }
        let buf = Arc::new(upload(v)?);
        counts.copies.fetch_add(1, Ordering::Relaxed);
        if keep {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            held.push_front((v.to_vec(), buf.clone()));
            let mut total: usize = held
                .iter()
                .map(|(h, _)| std::mem::size_of_val(&h[..]))
                .sum();
            while held.len() > ENTRIES || total > BYTES {
                let Some((h, buf)) = held.pop_back() else {
                    break;
                };
                total -= std::mem::size_of_val(&h[..]);
                release(buf);
            }
        }
        Ok(buf)
    }

    /// Forgets every array (their buffers are freed once no caller holds them).
    pub fn clear(&self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for (_, buf) in held.drain(..) {
            release(buf);
        }
    }
}

impl<T> Drop for Recent<T> {
    fn drop(&mut self) {
        let held = self.held.get_mut().unwrap_or_else(|e| e.into_inner());
        for (_, buf) in held.drain(..) {
            release(buf);
        }
    }
}

/// The most address tables one [`Tables`] keeps (a model has one a MoE layer); past it, all are
/// forgotten and copied again as they are asked for.
const TABLES: usize = 4096;

/// Tables of weight addresses (the routed experts' codes and scales, a table a MoE layer),
/// copied once and kept by their contents for as long as the lane lives: a table is asked for
/// with the addresses of the weights it must point at, so one found is always right, even if
/// weights were freed and others put at the same addresses.
#[derive(Default)]
pub(super) struct Tables {
    held: Mutex<HashMap<Vec<u64>, Arc<CudaSlice<u64>>>>,
}

impl Tables {
    /// A device buffer holding `v`: one copied earlier, or a new one from `upload`.
    pub fn get(
        &self,
        v: &[u64],
        counts: &UploadCounts,
        upload: impl FnOnce(&[u64]) -> Result<CudaSlice<u64>, DriverError>,
    ) -> Result<Arc<CudaSlice<u64>>, DriverError> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(buf) = held.get(v) {
            counts.reused.fetch_add(1, Ordering::Relaxed);
            counts.keep_for_capture(buf);
            return Ok(buf.clone());
        }
        let buf = Arc::new(upload(v)?);
        counts.copies.fetch_add(1, Ordering::Relaxed);
        if counts.capturing.load(Ordering::Relaxed) {
            return Ok(buf); // the capture is spoiled; nothing from it is kept
        }
        if held.len() >= TABLES {
            for (_, old) in held.drain() {
                release(old);
            }
        }
        held.insert(v.to_vec(), buf.clone());
        Ok(buf)
    }
}

impl Tables {
    /// Forgets every table (their buffers are freed once no caller holds them).
    pub fn clear(&self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for (_, buf) in held.drain() {
            release(buf);
        }
    }
}

impl Drop for Tables {
    fn drop(&mut self) {
        let held = self.held.get_mut().unwrap_or_else(|e| e.into_inner());
        for (_, buf) in held.drain() {
            release(buf);
        }
    }
}

/// Drops this holder of `buf`, with its context current on this thread in case it is the last
/// (cudarc frees a buffer without binding its context).
fn release<T>(buf: Arc<CudaSlice<T>>) {
    let _ = buf.context().bind_to_thread();
    drop(buf);
}

/// Arrays of several element types gathered for one copy to the device ([`Packed`]), each
/// starting at a multiple of 8 bytes.
#[derive(Default)]
pub(super) struct Pack {
    bytes: Vec<u8>,
}

/// Where [`Pack::push`] put an array: its byte offset and length.
pub(super) struct Part<T> {
    at: usize,
    len: usize,
    of: PhantomData<T>,
}

impl<T> Clone for Part<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Part<T> {}

impl Pack {
    /// Adds `v`; its values are read on the device through [`Packed::view`].
    pub fn push<T: bytemuck::Pod>(&mut self, v: &[T]) -> Part<T> {
        const {
            assert!(std::mem::align_of::<T>() <= 8, "parts are 8-byte aligned");
        }
        let at = self.bytes.len().next_multiple_of(8);
        self.bytes.resize(at, 0);
        self.bytes.extend_from_slice(bytemuck::cast_slice(v));
        Part {
            at,
            len: v.len(),
            of: PhantomData,
        }
    }

    /// The bytes to copy (at least one: an empty allocation is not a valid device pointer).
    pub fn bytes(&self) -> &[u8] {
        if self.bytes.is_empty() {
            &[0]
        } else {
            &self.bytes
        }
    }
}

/// A [`Pack`]'s bytes on the device.
pub(super) struct Packed(pub CudaSlice<u8>);

impl Drop for Packed {
    fn drop(&mut self) {
        // The buffer is freed next: see the module's note.
        let _ = self.0.context().bind_to_thread();
    }
}

impl Packed {
    /// The values of `part` (an empty view for an empty part).
    pub fn view<T: DeviceRepr>(&self, part: Part<T>) -> CudaView<'_, T> {
        let bytes = self
            .0
            .slice(part.at..part.at + part.len * std::mem::size_of::<T>());
        // SAFETY: these bytes are the values `Pack::push` wrote as a T array, at an offset
        // that is a multiple of 8 (T's alignment or more) in an allocation the driver aligns
        // to 256 bytes.
        unsafe { bytes.transmute::<T>(part.len) }.expect("a part's bytes hold its values")
    }
}

#[cfg(test)]
mod tests {
    use super::Pack;

    #[test]
    fn packed_parts_start_on_8_byte_boundaries_and_keep_their_bytes() {
        let mut pack = Pack::default();
        assert_eq!(pack.bytes(), [0], "an empty pack still copies a byte");
        let a = pack.push(&[1i32, -2, 3]);
        let b = pack.push(&[u64::MAX, 7]);
        let empty = pack.push::<f32>(&[]);
        let c = pack.push(&[0.5f32]);
        assert_eq!((a.at, a.len), (0, 3));
        assert_eq!(
            (b.at, b.len),
            (16, 2),
            "after 12 bytes, the next multiple of 8"
        );
        assert_eq!((empty.at, empty.len), (32, 0));
        assert_eq!((c.at, c.len), (32, 1));
        let bytes = pack.bytes();
        assert_eq!(bytes.len(), 36);
        let at = |p: usize, n: usize| &bytes[p..p + n];
        assert_eq!(at(0, 12), bytemuck::cast_slice::<i32, u8>(&[1, -2, 3]));
        assert_eq!(at(12, 4), [0; 4], "padding is zero");
        assert_eq!(at(16, 16), bytemuck::cast_slice::<u64, u8>(&[u64::MAX, 7]));
        assert_eq!(at(32, 4), 0.5f32.to_ne_bytes());
    }
}
