//! A worker's budget of request-body bytes in flight, shared by its REST and gRPC servers.
//!
//! `maxQueueDepth` counts requests and `maxRequestBytes` bounds one, but neither bounds their
//! product: a REST body is read whole before the request is admitted, and tonic buffers a
//! whole gRPC message before its handler runs, so N concurrent 64 MiB uploads cost N × 64 MiB
//! and can get the pod OOM-killed, losing every request in flight. Each request therefore
//! reserves the bytes its body may take *before* they are read ([`Budget::try_reserve`]) and
//! gives them back once it has been answered ([`Reservation`] on drop).
//!
//! A request that does not fit is refused at once (`RESOURCE_EXHAUSTED` / HTTP 429), as a full
//! admission queue refuses one: a request waiting for room while holding its own part-read
//! body could wait for ever on others doing the same, and a client told at once can retry
//! elsewhere.
//!
//! Over gRPC the reservation is made by [`GrpcBudget`], which wraps a tonic service and reads
//! each message's 5-byte prefix (compressed flag, length) as the body streams in.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use hyper::body::{Body as HttpBody, Bytes, Frame, SizeHint};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::Service;
use tonic::server::NamedService;

/// The unit of reservation: a `Semaphore` permit is one KiB, so that `acquire_many`'s `u32`
/// covers up to 4 TiB.
const KIB: usize = 1024;

/// The bytes of request bodies a worker may be receiving and holding at once. Cheap to clone;
/// clones share the budget.
#[derive(Clone, Debug)]
pub struct Budget {
    permits: Arc<Semaphore>,
    capacity_kib: u32,
    /// The setting that sizes the budget, named in refusals (`limits.maxRequestBytesInFlight`).
    setting: &'static str,
    /// Bytes reserved now.
    reserved: Gauge,
}

impl Budget {
    /// A budget of `bytes` (whole KiB), named `setting` in refusals, reporting what is
    /// reserved in `reserved`.
    pub fn new(bytes: usize, setting: &'static str, reserved: Gauge) -> Self {
        let capacity_kib = u32::try_from(bytes / KIB).unwrap_or(u32::MAX);
        Self {
            permits: Arc::new(Semaphore::new(capacity_kib as usize)),
            capacity_kib,
            setting,
            reserved,
        }
    }

    /// The whole budget, in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity_kib as usize * KIB
    }

    /// Bytes reserved now.
    pub fn reserved(&self) -> usize {
        let free = self
            .permits
            .available_permits()
            .min(self.capacity_kib as usize);
        (self.capacity_kib as usize - free) * KIB
    }

    /// Reserves `bytes` (rounded up to whole KiB), or refuses at once when they do not fit.
    ///
    /// A request larger than the whole budget reserves all of it, so it is taken only while
    /// nothing else is: the per-request limits, which the configuration keeps within the
    /// budget, bound it, and their headroom (REST framing, gRPC compression) must not make it
    /// refused for ever.
    pub fn try_reserve(&self, bytes: usize) -> Result<Reservation, Exhausted> {
        let kib = bytes.div_ceil(KIB).min(self.capacity_kib as usize);
        // At most `capacity_kib`, itself a `u32`.
        let kib = u32::try_from(kib).unwrap_or(self.capacity_kib);
        match Arc::clone(&self.permits).try_acquire_many_owned(kib) {
            Ok(permit) => {
                let bytes = i64::from(kib) * KIB as i64;
                self.reserved.inc_by(bytes);
                Ok(Reservation {
                    _permit: permit,
                    bytes,
                    reserved: self.reserved.clone(),
                })
            }
            // The semaphore is never closed: both errors mean it has too few permits.
            Err(_) => Err(Exhausted {
                receiving: self.reserved(),
                asked: kib as usize * KIB,
                capacity: self.capacity(),
                setting: self.setting,
            }),
        }
    }
}

/// Bytes taken from a [`Budget`], given back on drop.
#[derive(Debug)]
pub struct Reservation {
    _permit: OwnedSemaphorePermit,
    bytes: i64,
    reserved: Gauge,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.reserved.dec_by(self.bytes);
    }
}

/// A request refused because its body does not fit in the budget. The message is for the
/// client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "worker is receiving {} of request bodies; this request's {} would pass its budget of {} \
     ({setting}); retry later",
    size(*.receiving),
    size(*.asked),
    size(*.capacity)
)]
pub struct Exhausted {
    /// Bytes reserved by other requests.
    pub receiving: usize,
    /// Bytes this request asked for.
    pub asked: usize,
    /// The whole budget.
    pub capacity: usize,
    /// The setting that sizes the budget.
    pub setting: &'static str,
}

/// `bytes` for people: "3 MiB", "2.5 MiB", "12 KiB".
fn size(bytes: usize) -> String {
    const MIB: usize = 1 << 20;
    if bytes >= MIB {
        let mib = format!("{:.1}", bytes as f64 / MIB as f64);
        format!("{} MiB", mib.trim_end_matches(".0"))
    } else if bytes >= KIB {
        format!("{} KiB", bytes.div_ceil(KIB))
    } else {
        format!("{bytes} bytes")
    }
}

/// Called with each refusal, to count it as the role counts its other refusals.
pub type OnRefusal = Arc<dyn Fn(&Exhausted) + Send + Sync>;

/// A tonic service whose request messages reserve their bytes from a [`Budget`].
///
/// When a message's 5-byte prefix has arrived (it may be split across frames) the message
/// reserves its declared length, or, compressed, `max_message` (tonic's decoding limit, what
/// it may expand to; see `message_bytes`). A refusal ends the request body with
/// `RESOURCE_EXHAUSTED` and the budget's message: tonic passes a body error that is a
/// [`tonic::Status`] to the client unchanged (`Status::from_error` downcasts it). The
/// reservation is held until the handler has answered, not only until tonic drops the body
/// after decoding it, since the decoded message lives in the handler until then. A later
/// message of the same stream replaces the previous one's reservation.
#[derive(Clone)]
pub struct GrpcBudget<S> {
    inner: S,
    budget: Budget,
    max_message: usize,
    on_refusal: OnRefusal,
}

impl<S> GrpcBudget<S> {
    /// Wraps `inner`, whose decoding limit is `max_message`.
    pub fn new(inner: S, budget: Budget, max_message: usize, on_refusal: OnRefusal) -> Self {
        Self {
            inner,
            budget,
            max_message,
            on_refusal,
        }
    }
}

impl<S: NamedService> NamedService for GrpcBudget<S> {
    const NAME: &'static str = S::NAME;
}

type Slot = Arc<Mutex<Option<Reservation>>>;

impl<S> Service<http::Request<tonic::body::Body>> for GrpcBudget<S>
where
    S: Service<http::Request<tonic::body::Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let slot = Slot::default();
        let req = req.map(|body| {
            tonic::body::Body::new(MessageBudget {
                body,
                budget: self.budget.clone(),
                max_message: self.max_message,
                on_refusal: Arc::clone(&self.on_refusal),
                slot: Arc::clone(&slot),
                prefix: [0; PREFIX],
                have: 0,
                left: 0,
                refused: false,
            })
        });
        let answered = self.inner.call(req);
        Box::pin(async move {
            let response = answered.await;
            drop(slot);
            response
        })
    }
}

/// The gRPC message prefix: compressed flag (1 byte), length (4 bytes, big-endian).
const PREFIX: usize = 5;

/// A request body that reserves each message's bytes as its prefix goes by; the frames
/// themselves pass through unchanged.
struct MessageBudget {
    body: tonic::body::Body,
    budget: Budget,
    max_message: usize,
    on_refusal: OnRefusal,
    /// Where the current message's reservation is kept, shared with the response future.
    slot: Slot,
    prefix: [u8; PREFIX],
    /// Bytes of `prefix` received so far.
    have: usize,
    /// Bytes of the current message still to come.
    left: usize,
    refused: bool,
}

impl MessageBudget {
    /// Walks `data` for message prefixes, reserving each message's bytes.
    fn observe(&mut self, mut data: &[u8]) -> Result<(), Exhausted> {
        while !data.is_empty() {
            if self.left > 0 {
                let n = self.left.min(data.len());
                self.left -= n;
                data = &data[n..];
                continue;
            }
            let n = (PREFIX - self.have).min(data.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == PREFIX {
                self.have = 0;
                let [flag, len @ ..] = self.prefix;
                self.left = u32::from_be_bytes(len) as usize;
                let bytes = message_bytes(flag, self.left, self.max_message);
                let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
                // The previous message's bytes first: they are not added to this one's.
                *slot = None;
                *slot = Some(self.budget.try_reserve(bytes)?);
            }
        }
        Ok(())
    }
}

/// What a message with prefix `flag` and `len` may take: its length, or compressed (flag 1),
/// `max_message`, what it may expand to; nothing when it is over `max_message`, since tonic
/// refuses it at its prefix (`OUT_OF_RANGE`) before buffering it.
fn message_bytes(flag: u8, len: usize, max_message: usize) -> usize {
    if len > max_message {
        0
    } else if flag == 0 {
        len
    } else {
        max_message
    }
}

impl HttpBody for MessageBudget {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.get_mut();
        if this.refused {
            return Poll::Ready(None);
        }
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        if let Some(Ok(f)) = &frame
            && let Some(data) = f.data_ref()
            && let Err(e) = this.observe(data)
        {
            this.refused = true;
            (this.on_refusal)(&e);
            return Poll::Ready(Some(Err(tonic::Status::resource_exhausted(e.to_string()))));
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.refused || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::StreamExt as _;
    use tokio::sync::oneshot;

    use super::*;

    const MIB: usize = 1 << 20;

    fn budget(bytes: usize) -> Budget {
        Budget::new(bytes, "limits.maxRequestBytesInFlight", Gauge::default())
    }

    #[test]
    fn reservations_take_whole_kib_and_give_them_back_when_dropped() {
        let b = budget(3 * MIB);
        let one = b.try_reserve(2 * MIB).unwrap();
        let small = b.try_reserve(1).unwrap();
        assert_eq!(b.reserved(), 2 * MIB + KIB);
        assert_eq!(b.reserved.get(), (2 * MIB + KIB) as i64);
        drop(one);
        assert_eq!(b.reserved(), KIB);
        drop(small);
        assert_eq!((b.reserved(), b.reserved.get()), (0, 0));
        assert!(b.try_reserve(3 * MIB).is_ok(), "all of it, once free");
    }

    #[test]
    fn a_request_that_does_not_fit_is_refused_at_once_naming_what_is_in_flight_and_the_budget() {
        let b = budget(3 * MIB);
        let _held = b.try_reserve(2 * MIB).unwrap();
        let e = b.try_reserve(2 * MIB).unwrap_err();
        assert_eq!(
            e.to_string(),
            "worker is receiving 2 MiB of request bodies; this request's 2 MiB would pass its \
             budget of 3 MiB (limits.maxRequestBytesInFlight); retry later"
        );
        assert_eq!(b.reserved(), 2 * MIB, "a refusal reserves nothing");
        assert!(b.try_reserve(MIB).is_ok(), "what fits is still taken");
    }

    #[test]
    fn a_request_larger_than_the_whole_budget_takes_all_of_it_when_nothing_else_is_in_flight() {
        let b = budget(3 * MIB);
        let all = b.try_reserve(10 * MIB).unwrap();
        assert_eq!(b.reserved(), 3 * MIB);
        let e = b.try_reserve(10 * MIB).unwrap_err();
        assert_eq!((e.asked, e.receiving), (3 * MIB, 3 * MIB));
        drop(all);
        assert!(b.try_reserve(10 * MIB).is_ok());
    }

    #[test]
    fn an_empty_body_reserves_nothing_so_it_passes_a_full_budget() {
        let b = budget(3 * MIB);
        let _all = b.try_reserve(3 * MIB).unwrap();
        assert!(b.try_reserve(0).is_ok());
        assert!(b.try_reserve(1).is_err());
    }

    #[test]
    fn a_message_reserves_its_length_or_compressed_what_it_may_expand_to() {
        assert_eq!(message_bytes(0, 1000, 8 * MIB), 1000);
        assert_eq!(message_bytes(1, 1000, 8 * MIB), 8 * MIB);
        // Refused by tonic at its prefix, whatever the budget holds.
        assert_eq!(message_bytes(0, 9 * MIB, 8 * MIB), 0);
        assert_eq!(message_bytes(1, 9 * MIB, 8 * MIB), 0);
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(size(240 * MIB), "240 MiB");
        assert_eq!(size(5 * MIB / 2), "2.5 MiB");
        assert_eq!(size(12 * KIB), "12 KiB");
        assert_eq!(size(0), "0 bytes");
    }

    /// A gRPC body of `frames`.
    fn body(frames: Vec<Vec<u8>>) -> tonic::body::Body {
        let frames = futures::stream::iter(frames)
            .map(|f| Ok::<_, tonic::Status>(Frame::data(Bytes::from(f))));
        tonic::body::Body::new(http_body_util::StreamBody::new(frames))
    }

    fn prefix(compressed: bool, len: u32) -> Vec<u8> {
        let mut p = vec![u8::from(compressed)];
        p.extend_from_slice(&len.to_be_bytes());
        p
    }

    /// A service that reads the whole body, reports what its budget holds then, and answers
    /// once `answer` fires: the reservation must last until then.
    #[derive(Clone)]
    struct Reader {
        budget: Budget,
        seen: Arc<Mutex<Vec<Result<usize, tonic::Status>>>>,
        answer: Arc<Mutex<Option<oneshot::Receiver<()>>>>,
    }

    impl Reader {
        /// What the budget held once the first body was read, if it was read.
        fn first_read(&self) -> Option<usize> {
            self.seen.lock().unwrap()[0].as_ref().ok().copied()
        }
    }

    impl Service<http::Request<tonic::body::Body>> for Reader {
        type Response = ();
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<(), Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
            let this = self.clone();
            Box::pin(async move {
                let read = http_body_util::BodyExt::collect(req.into_body())
                    .await
                    .map(|_| this.budget.reserved());
                this.seen.lock().unwrap().push(read);
                let answer = this.answer.lock().unwrap().take();
                if let Some(rx) = answer {
                    let _ = rx.await;
                }
                Ok(())
            })
        }
    }

    fn wrap(b: &Budget, max_message: usize) -> (GrpcBudget<Reader>, Arc<AtomicUsize>) {
        let refusals = Arc::new(AtomicUsize::new(0));
        let r = Arc::clone(&refusals);
        let reader = Reader {
            budget: b.clone(),
            seen: Arc::default(),
            answer: Arc::default(),
        };
        let on_refusal: OnRefusal = Arc::new(move |_| {
            r.fetch_add(1, Ordering::SeqCst);
        });
        (
            GrpcBudget::new(reader, b.clone(), max_message, on_refusal),
            refusals,
        )
    }

    fn request(frames: Vec<Vec<u8>>) -> http::Request<tonic::body::Body> {
        http::Request::new(body(frames))
    }

    #[tokio::test]
    async fn a_prefix_split_across_frames_reserves_the_declared_length_until_the_answer() {
        let b = budget(3 * MIB);
        let (mut svc, refusals) = wrap(&b, 8 * MIB);
        let (tx, rx) = oneshot::channel();
        *svc.inner.answer.lock().unwrap() = Some(rx);
        let p = prefix(false, 2 * MIB as u32);
        let frames = vec![p[..2].to_vec(), p[2..].to_vec(), vec![0; 100]];
        let answered = tokio::spawn(svc.call(request(frames)));
        // The body was read and dropped by the service; its bytes are still reserved.
        while svc.inner.seen.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        assert_eq!(svc.inner.first_read(), Some(2 * MIB));
        assert_eq!(b.reserved(), 2 * MIB);
        tx.send(()).unwrap();
        answered.await.unwrap().unwrap();
        assert_eq!(b.reserved(), 0, "given back once answered");
        assert_eq!(refusals.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_compressed_message_reserves_what_it_may_expand_to() {
        let b = budget(16 * MIB);
        let (mut svc, _) = wrap(&b, 8 * MIB);
        svc.call(request(vec![prefix(true, 100), vec![0; 100]]))
            .await
            .unwrap();
        assert_eq!(svc.inner.first_read(), Some(8 * MIB));
    }

    #[tokio::test]
    async fn a_message_that_does_not_fit_ends_the_body_with_resource_exhausted_and_the_reason() {
        let b = budget(3 * MIB);
        let _held = b.try_reserve(2 * MIB).unwrap();
        let (mut svc, refusals) = wrap(&b, 8 * MIB);
        let mut frames = vec![prefix(false, 2 * MIB as u32)];
        frames.push(vec![0; 1000]);
        svc.call(request(frames)).await.unwrap();
        let seen = svc.inner.seen.lock().unwrap();
        let status = seen[0].as_ref().unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().starts_with(
                "worker is receiving 2 MiB of request bodies; this request's 2 MiB would pass \
                 its budget of 3 MiB"
            ),
            "{}",
            status.message()
        );
        // What tonic's decoder does with a body error: the client gets this status.
        let passed = tonic::Status::from_error(Box::new(status.clone()));
        assert_eq!(
            (passed.code(), passed.message()),
            (status.code(), status.message())
        );
        assert_eq!(refusals.load(Ordering::SeqCst), 1);
        assert_eq!(b.reserved(), 2 * MIB);
    }

    #[tokio::test]
    async fn each_message_of_a_stream_replaces_the_previous_ones_reservation() {
        let b = budget(3 * MIB);
        let (mut svc, refusals) = wrap(&b, 8 * MIB);
        let mut first = prefix(false, 4);
        first.extend_from_slice(&[1, 2, 3, 4]);
        first.extend_from_slice(&prefix(false, 2 * MIB as u32)[..1]);
        let frames = vec![first, prefix(false, 2 * MIB as u32)[1..].to_vec()];
        svc.call(request(frames)).await.unwrap();
        assert_eq!(svc.inner.first_read(), Some(2 * MIB));
        assert_eq!(refusals.load(Ordering::SeqCst), 0);
    }
}
