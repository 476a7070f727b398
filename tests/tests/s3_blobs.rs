//! The S3 blob store against a real S3 (SeaweedFS on loopback): round trips,
//! ranged reads, idempotent puts, corruption behind our back, missing
//! objects, wrong credentials and bucket creation.

use std::path::Path;

use hotswap_common::artifact::Digest;
use hotswap_control_plane::blobs::{
    BlobError, BlobStore, S3Blobs, S3Config, S3Credentials, create_bucket_if_missing,
};
use hotswap_tests::{S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, SeaweedS3, TestDir};
use object_store::ObjectStoreExt;
use tokio::io::AsyncReadExt;

fn credentials() -> S3Credentials {
    S3Credentials {
        access_key_id: S3_ACCESS_KEY.to_string(),
        secret_access_key: S3_SECRET_KEY.to_string(),
        session_token: None,
    }
}

fn config(s3: &SeaweedS3, prefix: &str) -> S3Config {
    S3Config {
        bucket: s3.bucket.clone(),
        prefix: prefix.to_string(),
        endpoint: Some(s3.endpoint.clone()),
        region: S3_REGION.to_string(),
    }
}

fn open(s3: &SeaweedS3, prefix: &str, dir: &TestDir) -> S3Blobs {
    S3Blobs::open(
        &config(s3, prefix),
        &credentials(),
        &dir.path().join("staging"),
    )
    .expect("open s3 blobs")
}

/// A plain object_store client for the same bucket: what "someone else"
/// writing to it behind our back uses.
fn raw_client(s3: &SeaweedS3) -> object_store::aws::AmazonS3 {
    object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(&s3.bucket)
        .with_region(S3_REGION)
        .with_endpoint(&s3.endpoint)
        .with_allow_http(true)
        .with_access_key_id(S3_ACCESS_KEY)
        .with_secret_access_key(S3_SECRET_KEY)
        .build()
        .expect("raw client")
}

/// Content of `len` bytes that differ from position to position.
fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// Stage `prefix_junk` bytes, then `body`: put_from reads the body at an
/// offset, as the artifacts service does with an upload's content.
fn stage(dir: &Path, name: &str, body: &[u8]) -> (std::path::PathBuf, u64) {
    let path = dir.join(name);
    let mut staged = b"header bytes before the content".to_vec();
    let offset = staged.len() as u64;
    staged.extend_from_slice(body);
    std::fs::write(&path, staged).expect("stage");
    (path, offset)
}

async fn read_from(blobs: &S3Blobs, digest: &Digest, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut blob = blobs.open(digest, offset).await.expect("open");
    let mut out = Vec::new();
    blob.reader.read_to_end(&mut out).await.map(|_| out)
}

#[tokio::test]
async fn blobs_round_trip_with_ranged_reads_and_idempotent_puts() {
    let s3 = SeaweedS3::start("artifacts");
    let dir = TestDir::new();
    let blobs = open(&s3, "cluster-a", &dir);

    let small = content(300 * 1024, 1);
    let digest = Digest::of(&small);
    assert!(!blobs.contains(&digest).await.expect("contains before"));
    let (staged, offset) = stage(dir.path(), "small", &small);
    blobs
        .put_from(&staged, offset, small.len() as u64, &digest)
        .await
        .expect("put");
    assert!(blobs.contains(&digest).await.expect("contains"));
    assert_eq!(blobs.size(&digest).await.expect("size"), small.len() as u64);

    // Under the prefix, named by the digest.
    let raw = raw_client(&s3);
    let key = object_store::path::Path::from(format!("cluster-a/sha256/{}", digest.hex()));
    let first = raw.head(&key).await.expect("object under its key");
    assert_eq!(first.size, small.len() as u64);

    let whole = blobs
        .read_small(&digest, 1024 * 1024)
        .await
        .expect("read small")
        .expect("small enough");
    assert_eq!(&whole[..], &small[..]);
    assert_eq!(
        blobs.read_small(&digest, 1000).await.expect("too big"),
        None
    );

    // Ranged: from the start, from the middle, at the very end, past it.
    assert_eq!(read_from(&blobs, &digest, 0).await.expect("read 0"), small);
    let middle = 123_457u64;
    assert_eq!(
        read_from(&blobs, &digest, middle)
            .await
            .expect("read middle"),
        &small[middle as usize..]
    );
    let end = small.len() as u64;
    assert!(
        read_from(&blobs, &digest, end)
            .await
            .expect("read end")
            .is_empty()
    );
    match blobs.open(&digest, end + 1).await {
        Err(BlobError::PastEnd { size, .. }) => assert_eq!(size, end),
        Err(e) => panic!("past the end: {e}"),
        Ok(_) => panic!("past the end was opened"),
    }

    // A second put of the same digest is a no-op: the object is not rewritten.
    blobs
        .put_from(&staged, offset, small.len() as u64, &digest)
        .await
        .expect("second put");
    let again = raw.head(&key).await.expect("head again");
    assert_eq!(again.e_tag, first.e_tag);
    assert_eq!(again.last_modified, first.last_modified);
    // The store honours create-only puts, which a put that lost a race
    // with another relies on.
    let err = object_store::ObjectStore::put_opts(
        &raw,
        &key,
        b"other bytes".to_vec().into(),
        object_store::PutMode::Create.into(),
    )
    .await
    .expect_err("create-only over an existing object");
    assert!(
        matches!(
            err,
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }
        ),
        "{err}"
    );
    assert_eq!(
        read_from(&blobs, &digest, 0).await.expect("unchanged"),
        small
    );

    // Staged bytes that are not what the digest names are refused, and
    // nothing is stored.
    let claimed = Digest::of(b"something else entirely");
    let err = blobs
        .put_from(&staged, offset, small.len() as u64, &claimed)
        .await
        .expect_err("digest mismatch");
    assert!(matches!(err, BlobError::Corrupt { .. }), "{err}");
    assert!(!blobs.contains(&claimed).await.expect("contains claimed"));

    // Big content goes up in parts and reads back checked.
    let big = content(17 * 1024 * 1024 + 5, 2);
    let big_digest = Digest::of(&big);
    let (big_staged, big_offset) = stage(dir.path(), "big", &big);
    blobs
        .put_from(&big_staged, big_offset, big.len() as u64, &big_digest)
        .await
        .expect("multipart put");
    assert_eq!(
        blobs.size(&big_digest).await.expect("big size"),
        big.len() as u64
    );
    let tail_at = 16 * 1024 * 1024 + 3;
    assert_eq!(
        read_from(&blobs, &big_digest, tail_at)
            .await
            .expect("big tail"),
        &big[tail_at as usize..]
    );
    assert_eq!(
        read_from(&blobs, &big_digest, 0).await.expect("big whole"),
        big
    );
}

#[tokio::test]
async fn an_object_changed_behind_our_back_is_never_served() {
    let s3 = SeaweedS3::start("artifacts");
    let dir = TestDir::new();
    let blobs = open(&s3, "", &dir);
    let raw = raw_client(&s3);

    let body = content(600 * 1024, 3);
    let digest = Digest::of(&body);
    let (staged, offset) = stage(dir.path(), "body", &body);
    blobs
        .put_from(&staged, offset, body.len() as u64, &digest)
        .await
        .expect("put");

    // Same length, one byte flipped near the end.
    let mut tampered = body.clone();
    let last = tampered.len() - 10;
    tampered[last] ^= 0xff;
    let key = object_store::path::Path::from(format!("sha256/{}", digest.hex()));
    raw.put(&key, tampered.into()).await.expect("overwrite");

    let err = blobs
        .read_small(&digest, 1024 * 1024)
        .await
        .expect_err("corrupt whole read");
    assert!(matches!(err, BlobError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(&digest.to_string()), "{err}");

    // Streamed: the read fails, naming the digest, before the whole blob
    // was handed out.
    let mut blob = blobs.open(&digest, 0).await.expect("open");
    let mut got = Vec::new();
    let err = blob
        .reader
        .read_to_end(&mut got)
        .await
        .expect_err("corrupt stream");
    assert!(err.to_string().contains(&digest.to_string()), "{err}");
    assert!(
        got.len() < body.len(),
        "{} of {} bytes served",
        got.len(),
        body.len()
    );
    // From an offset too: the bytes before it are checked all the same.
    let mut blob = blobs
        .open(&digest, 500 * 1024)
        .await
        .expect("open at offset");
    let mut got = Vec::new();
    blob.reader
        .read_to_end(&mut got)
        .await
        .expect_err("corrupt stream from an offset");

    // Shorter content under the name: a put of the right content does not
    // take it for the blob.
    raw.put(&key, b"short".to_vec().into())
        .await
        .expect("overwrite short");
    let err = blobs
        .put_from(&staged, offset, body.len() as u64, &digest)
        .await
        .expect_err("size mismatch");
    assert!(matches!(err, BlobError::Corrupt { .. }), "{err}");
}

#[tokio::test]
async fn missing_blobs_wrong_credentials_and_bucket_creation() {
    let s3 = SeaweedS3::start("artifacts");
    let dir = TestDir::new();
    let blobs = open(&s3, "p", &dir);

    let missing = Digest::of(b"never stored");
    assert!(!blobs.contains(&missing).await.expect("contains"));
    for err in [
        blobs.size(&missing).await.expect_err("size"),
        blobs
            .read_small(&missing, 1024)
            .await
            .expect_err("read small"),
        blobs.open(&missing, 0).await.err().expect("open"),
    ] {
        assert!(matches!(err, BlobError::NotFound { .. }), "{err}");
        assert_eq!(err.to_string(), format!("no blob with digest {missing}"));
    }

    // Wrong secret: a clear refusal that says where credentials come from.
    let wrong = S3Credentials {
        secret_access_key: "not-the-secret".to_string(),
        ..credentials()
    };
    let denied = S3Blobs::open(&config(&s3, "p"), &wrong, &dir.path().join("staging-2"))
        .expect("open with wrong keys");
    let err = denied.contains(&missing).await.expect_err("wrong keys");
    assert!(matches!(err, BlobError::Denied { .. }), "{err}");
    assert!(err.to_string().contains("AWS_SECRET_ACCESS_KEY"), "{err}");
    let (staged, offset) = stage(dir.path(), "x", b"content");
    let err = denied
        .put_from(&staged, offset, 7, &Digest::of(b"content"))
        .await
        .expect_err("wrong keys put");
    assert!(matches!(err, BlobError::Denied { .. }), "{err}");

    // Bucket creation: made once, found the second time, then usable.
    let mut fresh = config(&s3, "q");
    fresh.bucket = "made-by-hotswap".to_string();
    assert!(
        create_bucket_if_missing(&fresh, &credentials())
            .await
            .expect("create")
    );
    assert!(
        !create_bucket_if_missing(&fresh, &credentials())
            .await
            .expect("create again")
    );
    let err = create_bucket_if_missing(&config(&s3, "q"), &wrong)
        .await
        .expect_err("create with wrong keys");
    assert!(matches!(err, BlobError::Denied { .. }), "{err}");
    let in_fresh =
        S3Blobs::open(&fresh, &credentials(), &dir.path().join("staging-3")).expect("open fresh");
    let digest = Digest::of(b"content");
    in_fresh
        .put_from(&staged, offset, 7, &digest)
        .await
        .expect("put in the new bucket");
    assert_eq!(
        in_fresh
            .read_small(&digest, 100)
            .await
            .expect("read")
            .as_deref(),
        Some(&b"content"[..])
    );
}
