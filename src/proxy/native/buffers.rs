//! Buffers held only while working: a connection waiting for its next request holds none.
//! When bytes arrive it takes one from its thread's free list, and gives it back when the
//! request is done. Buffers are allocated once (zeroed) and reused, so a request on a warm
//! thread allocates nothing.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

use crate::h1::request::RequestHead;
use crate::h1::response::ResponseHead;

/// The size of a pooled buffer: a request head of ordinary size, or a piece of a body.
pub const SIZE: usize = 16 * 1024;
/// Free buffers kept per thread; more are freed. 256 buffers are 4 MiB.
const MAX_FREE: usize = 256;

thread_local! {
    static FREE: RefCell<Vec<Box<[u8]>>> = RefCell::new(Vec::with_capacity(MAX_FREE));
    static FREE_WORK: RefCell<Vec<Box<Parts>>> = RefCell::new(Vec::with_capacity(MAX_FREE));
}

/// What a request in flight needs besides its bytes: the parsed heads (a few KiB each, so
/// they must not live in the connection's task, whose size every idle connection pays) and
/// the buffer heads are written into.
#[derive(Debug, Default)]
pub struct Parts {
    pub request: RequestHead,
    pub response: ResponseHead,
    pub out: Vec<u8>,
}

/// [`Parts`] from this thread's free list, given back on drop.
#[derive(Debug)]
pub struct Work(Option<Box<Parts>>);

impl Work {
    pub fn take() -> Work {
        let parts = FREE_WORK.with(|f| f.borrow_mut().pop()).unwrap_or_else(|| {
            let mut p = Box::<Parts>::default();
            p.out.reserve(4096);
            p
        });
        Work(Some(parts))
    }
}

impl Deref for Work {
    type Target = Parts;
    fn deref(&self) -> &Parts {
        self.0.as_deref().expect("present until drop")
    }
}

impl DerefMut for Work {
    fn deref_mut(&mut self) -> &mut Parts {
        self.0.as_deref_mut().expect("present until drop")
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        let Some(mut parts) = self.0.take() else { return };
        if parts.out.capacity() > 64 * 1024 {
            return;
        }
        parts.out.clear();
        let _ = FREE_WORK.try_with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < MAX_FREE {
                f.push(parts);
            }
        });
    }
}

/// A byte buffer with a filled window `start..end`: bytes are read in at `end` and taken
/// from `start`.
pub struct Buf {
    data: Box<[u8]>,
    pub start: usize,
    pub end: usize,
}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buf({}..{} of {})", self.start, self.end, self.data.len())
    }
}

impl Buf {
    /// A buffer of [`SIZE`] from this thread's free list, or a new one.
    pub fn take() -> Buf {
        let data = FREE.with(|f| f.borrow_mut().pop()).unwrap_or_else(|| vec![0u8; SIZE].into_boxed_slice());
        Buf { data, start: 0, end: 0 }
    }

    /// Everything up to the end of the filled bytes, including what was taken: a head
    /// parsed at the start keeps its ranges valid.
    pub fn bytes(&self) -> &[u8] {
        &self.data[..self.end]
    }

    /// The filled bytes.
    pub fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// Room to read into after the filled bytes.
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.data[self.end..]
    }

    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.data.len()
    }

    /// Moves the filled bytes to the front, making all the room there is.
    pub fn compact(&mut self) {
        if self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Empties the buffer.
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Grows the buffer to `size` bytes (a head larger than [`SIZE`]); the filled bytes
    /// move to the front. A grown buffer is freed, not pooled, when dropped.
    pub fn grow(&mut self, size: usize) {
        if size <= self.data.len() {
            return;
        }
        let mut data = vec![0u8; size].into_boxed_slice();
        let n = self.end - self.start;
        data[..n].copy_from_slice(self.filled());
        self.data = data;
        self.start = 0;
        self.end = n;
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if self.data.len() != SIZE {
            return;
        }
        let data = std::mem::take(&mut self.data);
        // At thread exit the free list may already be gone: the buffer is then freed.
        let _ = FREE.try_with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < MAX_FREE {
                f.push(data);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_on_the_same_thread() {
        let a = Buf::take();
        let ptr = a.data.as_ptr();
        drop(a);
        let b = Buf::take();
        assert_eq!(b.data.as_ptr(), ptr);
        assert_eq!((b.start, b.end, b.capacity()), (0, 0, SIZE));
    }

    #[test]
    fn a_future_in_a_slot_runs_is_dropped_in_place_and_its_slot_reused() {
        use std::rc::Rc;
        let dropped = Rc::new(());
        let held = dropped.clone();
        let f = InSlot::new(async move {
            let _held = held;
            7
        });
        let first = f.slot.as_ref().unwrap().0.as_ptr();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert_eq!(rt.block_on(f), 7);
        assert_eq!(Rc::strong_count(&dropped), 1, "the future was dropped");
        // Dropped unpolled, the future's captures go too.
        let held = dropped.clone();
        drop(InSlot::new(async move { drop(held) }));
        assert_eq!(Rc::strong_count(&dropped), 1);
        let again = InSlot::new(async {});
        assert_eq!(again.slot.as_ref().unwrap().0.as_ptr(), first, "the slot came from the free list");
    }

    #[test]
    fn compact_and_grow_keep_the_filled_bytes() {
        let mut b = Buf::take();
        b.spare()[..5].copy_from_slice(b"hello");
        b.end = 5;
        b.start = 2;
        b.compact();
        assert_eq!(b.filled(), b"llo");
        b.grow(SIZE * 2);
        assert_eq!((b.filled(), b.capacity()), (&b"llo"[..], SIZE * 2));
        let grown = b.data.as_ptr();
        drop(b);
        assert_ne!(Buf::take().data.as_ptr(), grown);
    }
}

/// Bytes of a slot that holds one request's future. The future of `conn::request` must
/// fit (checked at compile time where it is placed).
pub const SLOT: usize = 4096;

/// Storage for one future, aligned for anything a future holds.
#[repr(C, align(16))]
struct Slot([std::mem::MaybeUninit<u8>; SLOT]);

thread_local! {
    static FREE_SLOTS: RefCell<Vec<Box<Slot>>> = RefCell::new(Vec::with_capacity(MAX_FREE));
}

/// A future kept in a slot from its thread's free list instead of inline in its caller.
///
/// A task is as big as its largest state, and a connection's task spends nearly all its
/// life waiting for the next request: holding the request's future (a few KiB) inline
/// would make every idle connection pay for it. In a pooled slot it costs a pointer while
/// idle, and a request on a warm thread still allocates nothing.
pub struct InSlot<F: std::future::Future> {
    slot: Option<Box<Slot>>,
    _holds: std::marker::PhantomData<F>,
}

impl<F: std::future::Future> InSlot<F> {
    const FITS: () =
        assert!(std::mem::size_of::<F>() <= SLOT && std::mem::align_of::<F>() <= 16, "the future does not fit a slot");

    pub fn new(future: F) -> InSlot<F> {
        #[allow(clippy::let_unit_value)]
        let () = Self::FITS;
        let mut slot = FREE_SLOTS
            .with(|f| f.borrow_mut().pop())
            .unwrap_or_else(|| Box::new(Slot([std::mem::MaybeUninit::uninit(); SLOT])));
        // SAFETY: the slot is at least as large and as aligned as `F` (checked above), and
        // nothing else uses it until `drop` gives it back.
        unsafe { slot.0.as_mut_ptr().cast::<F>().write(future) };
        InSlot { slot: Some(slot), _holds: std::marker::PhantomData }
    }
}

impl<F: std::future::Future> std::future::Future for InSlot<F> {
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        // SAFETY: the future lives in the boxed slot, which does not move when `InSlot`
        // does, and is dropped in place by `drop`: it is never moved once polled.
        unsafe {
            let this = self.get_unchecked_mut();
            let slot = this.slot.as_mut().expect("present until drop");
            std::pin::Pin::new_unchecked(&mut *slot.0.as_mut_ptr().cast::<F>()).poll(cx)
        }
    }
}

impl<F: std::future::Future> Drop for InSlot<F> {
    fn drop(&mut self) {
        let Some(mut slot) = self.slot.take() else { return };
        // SAFETY: `new` wrote an `F` here and nothing has dropped it.
        unsafe { std::ptr::drop_in_place(slot.0.as_mut_ptr().cast::<F>()) };
        let _ = FREE_SLOTS.try_with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < MAX_FREE {
                f.push(slot);
            }
        });
    }
}
