//! The `.hsm` byte layout, the content digest and the signature statement.
//!
//! ```text
//! file      = MAGIC(8) content_len:u64 content sig_count:u16 signature* trailer
//! content   = manifest_len:u32 manifest(UTF-8 TOML) payload(tar.zst)
//! signature = key_id_len:u8 key_id signed_at_ms:u64 expires_at_ms:u64 ed25519(64)
//! trailer   = SHA-256(MAGIC content_len digest sig_count signature*)   (version 2)
//!           = SHA-256 of every byte before it                          (version 1)
//! ```
//! Integers are big-endian. `expires_at_ms` 0 means "no expiry". The digest is
//! SHA-256 over `content`. Nothing may follow the trailer.
//!
//! The trailer is for integrity, not authenticity: it catches corruption in
//! parts no verifier can check, such as a signature by a key it does not know.
//! Version 2 covers the content through its digest, which every reader
//! computes anyway, so a file is hashed once rather than twice; corrupt
//! content still fails the trailer, because its digest changes. Files are
//! written as version 2; version 1 files are read as before.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};

use std::path::Path;

use sha2::Digest as _;
use sha2::Sha256;

use super::ArtifactError;
use crate::manifest::{Manifest, parse_manifest};

/// The magic of the version written (2).
pub const MAGIC: &[u8; 8] = b"HSMOD\x00\x02\n";
/// The magic of version 1, whose trailer hashes the content again.
pub const MAGIC_V1: &[u8; 8] = b"HSMOD\x00\x01\n";
/// Manifests are small; a bigger one is a mistake or an attack.
pub const MAX_MANIFEST_BYTES: u32 = 64 * 1024;
pub const MAX_SIGNATURES: u16 = 16;
const MAX_KEY_ID_BYTES: u8 = 64;
const SIGNATURE_BYTES: usize = 64;

/// SHA-256 of an artifact's content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        Digest(Sha256::digest(bytes).into())
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parse `sha256:<64 hex>`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("invalid digest {text:?}: expected sha256: followed by 64 hex digits");
        let hex_part = text.strip_prefix("sha256:").ok_or_else(bad)?;
        let bytes = hex::decode(hex_part).map_err(|_| bad())?;
        Ok(Digest(bytes.try_into().map_err(|_| bad())?))
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// One signature as stored in an artifact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    /// Key id (`ed25519:<hex>`) of the publisher key.
    pub key_id: String,
    pub signed_at_ms: u64,
    pub expires_at_ms: Option<u64>,
    pub bytes: [u8; SIGNATURE_BYTES],
}

/// The exact bytes a signature covers.
pub fn statement(
    name: &str,
    version: &str,
    digest: &Digest,
    key_id: &str,
    signed_at_ms: u64,
    expires_at_ms: Option<u64>,
) -> Vec<u8> {
    let expires = expires_at_ms.map_or_else(|| "none".to_string(), |ms| ms.to_string());
    format!(
        "hotswap-artifact-signature-v1\nname={name}\nversion={version}\ndigest={digest}\nkey={key_id}\nsigned-at={signed_at_ms}\nexpires-at={expires}\n"
    )
    .into_bytes()
}

/// What reading an artifact yields: parsed manifest, digest, signatures, and
/// where the content and payload sit in the file.
#[derive(Clone, Debug)]
pub struct ArtifactInfo {
    pub manifest: Manifest,
    pub manifest_text: String,
    pub digest: Digest,
    pub signatures: Vec<Signature>,
    /// Offset of `content` in the file and its length.
    pub content_offset: u64,
    pub content_len: u64,
    /// Offset of the payload (tar.zst) in the file and its length.
    pub payload_offset: u64,
    pub payload_len: u64,
}

impl ArtifactInfo {
    /// `name@version`, for messages.
    pub fn module(&self) -> String {
        format!("{}@{}", self.manifest.name, self.manifest.version)
    }
}

fn format_err(reason: impl Into<String>) -> ArtifactError {
    ArtifactError::Format(reason.into())
}

/// Hashes what is read through it while `hashing`, for the trailer check.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    hashing: bool,
    position: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if self.hashing {
            self.hasher.update(&buf[..n]);
        }
        self.position += n as u64;
        Ok(n)
    }
}

fn read_exact<R: Read>(reader: &mut R, buf: &mut [u8], what: &str) -> Result<(), ArtifactError> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            format_err(format!("truncated: file ends inside the {what}"))
        }
        _ => format_err(format!("cannot read the {what}: {e}")),
    })
}

fn read_u64<R: Read>(reader: &mut R, what: &str) -> Result<u64, ArtifactError> {
    let mut buf = [0u8; 8];
    read_exact(reader, &mut buf, what)?;
    Ok(u64::from_be_bytes(buf))
}

/// Read and check the structure of an artifact file, hashing its content in
/// a streaming pass (the payload is never held in memory).
pub fn read_artifact(path: &Path) -> Result<ArtifactInfo, ArtifactError> {
    let io = |source| ArtifactError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    read_artifact_from(BufReader::new(file), file_len)
}

/// As [`read_artifact`], from any seekable reader of `total_len` bytes.
pub fn read_artifact_from<R: Read>(
    reader: R,
    total_len: u64,
) -> Result<ArtifactInfo, ArtifactError> {
    read_artifact_and_prefix(reader, total_len).map(|(info, _)| info)
}

/// As [`read_artifact_from`], also returning the trailer's hash state after
/// the header and content (before the signature count), so a caller that
/// replaces the signatures ([`write_tail`]) needs no second pass.
pub(super) fn read_artifact_and_prefix<R: Read>(
    reader: R,
    total_len: u64,
) -> Result<(ArtifactInfo, Sha256), ArtifactError> {
    let mut reader = HashingReader {
        inner: reader,
        hasher: Sha256::new(),
        hashing: true,
        position: 0,
    };
    let mut magic = [0u8; 8];
    read_exact(&mut reader, &mut magic, "header")?;
    let digest_in_trailer = match &magic {
        MAGIC => true,
        MAGIC_V1 => false,
        _ => {
            return Err(format_err(
                "bad magic: this is not a .hsm file (or a newer format version)",
            ));
        }
    };
    let content_len = read_u64(&mut reader, "header")?;
    // Version 2: the trailer takes the content's digest, not its bytes.
    reader.hashing = !digest_in_trailer;
    if content_len > total_len.saturating_sub(CONTENT_OFFSET) {
        return Err(format_err(format!(
            "truncated: header announces {content_len} content bytes but the file has {}",
            total_len.saturating_sub(CONTENT_OFFSET)
        )));
    }
    let mut len4 = [0u8; 4];
    read_exact(&mut reader, &mut len4, "manifest length")?;
    let manifest_len = u32::from_be_bytes(len4);
    if manifest_len > MAX_MANIFEST_BYTES || u64::from(manifest_len) + 4 > content_len {
        return Err(format_err(format!(
            "manifest length {manifest_len} is out of range"
        )));
    }
    let mut manifest_bytes = vec![0u8; manifest_len as usize];
    read_exact(&mut reader, &mut manifest_bytes, "manifest")?;
    // Hash the content: length prefix, manifest, then the payload streamed.
    // The manifest is parsed only after the integrity check, so corruption is
    // reported as corruption rather than as a puzzling manifest error.
    let mut hasher = Sha256::new();
    hasher.update(len4);
    hasher.update(&manifest_bytes);
    let mut remaining = content_len - 4 - u64::from(manifest_len);
    let mut chunk = vec![0u8; 64 * 1024];
    while remaining > 0 {
        let n = remaining.min(chunk.len() as u64) as usize;
        read_exact(&mut reader, &mut chunk[..n], "payload")?;
        hasher.update(&chunk[..n]);
        remaining -= n as u64;
    }
    let digest = Digest(hasher.finalize().into());
    if digest_in_trailer {
        reader.hasher.update(digest.0);
        reader.hashing = true;
    }
    let prefix = reader.hasher.clone();

    let mut count = [0u8; 2];
    read_exact(&mut reader, &mut count, "signature count")?;
    let count = u16::from_be_bytes(count);
    if count > MAX_SIGNATURES {
        return Err(format_err(format!(
            "{count} signatures; at most {MAX_SIGNATURES} are allowed"
        )));
    }
    let mut signatures = Vec::with_capacity(count as usize);
    for i in 0..count {
        let what = format!("signature {}", i + 1);
        let mut id_len = [0u8; 1];
        read_exact(&mut reader, &mut id_len, &what)?;
        if id_len[0] == 0 || id_len[0] > MAX_KEY_ID_BYTES {
            return Err(format_err(format!(
                "{what}: key id length {} is out of range",
                id_len[0]
            )));
        }
        let mut id = vec![0u8; id_len[0] as usize];
        read_exact(&mut reader, &mut id, &what)?;
        let key_id = String::from_utf8(id)
            .map_err(|_| format_err(format!("{what}: key id is not UTF-8")))?;
        let signed_at_ms = read_u64(&mut reader, &what)?;
        let expires_at_ms = match read_u64(&mut reader, &what)? {
            0 => None,
            ms => Some(ms),
        };
        let mut bytes = [0u8; SIGNATURE_BYTES];
        read_exact(&mut reader, &mut bytes, &what)?;
        signatures.push(Signature {
            key_id,
            signed_at_ms,
            expires_at_ms,
            bytes,
        });
    }
    let expected: [u8; 32] = reader.hasher.clone().finalize().into();
    let position = reader.position;
    let mut trailer = [0u8; 32];
    read_exact(&mut reader.inner, &mut trailer, "integrity trailer")?;
    if position + 32 != total_len {
        return Err(format_err(format!(
            "{} unexpected bytes after the integrity trailer",
            total_len.saturating_sub(position + 32)
        )));
    }
    if trailer != expected {
        return Err(format_err("integrity check failed: the file is corrupt"));
    }
    let info = assemble_info(manifest_bytes, digest, signatures, content_len)?;
    Ok((info, prefix))
}

/// Where `content` starts in a `.hsm` file: after the magic and its length.
pub const CONTENT_OFFSET: u64 = 16;

/// The info of an artifact whose `content_len` content bytes start with
/// `manifest_bytes` (after the length prefix): parses the manifest and
/// places everything as it is laid out in the file.
fn assemble_info(
    manifest_bytes: Vec<u8>,
    digest: Digest,
    signatures: Vec<Signature>,
    content_len: u64,
) -> Result<ArtifactInfo, ArtifactError> {
    let manifest_len = manifest_bytes.len() as u64;
    let manifest_text = String::from_utf8(manifest_bytes)
        .map_err(|_| format_err("the manifest is not valid UTF-8"))?;
    let manifest = parse_manifest("module.toml (in artifact)", &manifest_text)?;
    Ok(ArtifactInfo {
        manifest,
        manifest_text,
        digest,
        signatures,
        content_offset: CONTENT_OFFSET,
        content_len,
        payload_offset: CONTENT_OFFSET + 4 + manifest_len,
        payload_len: content_len - 4 - manifest_len,
    })
}

/// What [`read_artifact_from`] gives for a file made of `content` and
/// `signatures`, for a caller that received the content over the wire and
/// has already checked that it hashes to `digest`: the manifest is parsed
/// from the content and nothing is hashed again. Offsets are those of the
/// file [`write_artifact`] would write.
pub fn content_info(
    content: &[u8],
    digest: Digest,
    signatures: Vec<Signature>,
) -> Result<ArtifactInfo, ArtifactError> {
    describe(content, digest, signatures, content.len() as u64)
}

/// The info of an artifact of `content_len` content bytes that hash to
/// `digest`, from `head`, the first of those bytes: the manifest length,
/// then (at least) the manifest.
pub(super) fn describe(
    head: &[u8],
    digest: Digest,
    signatures: Vec<Signature>,
    content_len: u64,
) -> Result<ArtifactInfo, ArtifactError> {
    let (len4, rest) = head
        .split_first_chunk::<4>()
        .ok_or_else(|| format_err("truncated: no manifest length"))?;
    let manifest_len = u32::from_be_bytes(*len4);
    if manifest_len > MAX_MANIFEST_BYTES || manifest_len as usize > rest.len() {
        return Err(format_err(format!(
            "manifest length {manifest_len} is out of range"
        )));
    }
    if signatures.len() > usize::from(MAX_SIGNATURES) {
        return Err(format_err(format!(
            "{} signatures; at most {MAX_SIGNATURES} are allowed",
            signatures.len()
        )));
    }
    assemble_info(
        rest[..manifest_len as usize].to_vec(),
        digest,
        signatures,
        content_len,
    )
}

/// The `content` section for a manifest and payload.
pub fn encode_content(manifest_text: &str, payload: &[u8]) -> Vec<u8> {
    let mut content = Vec::with_capacity(4 + manifest_text.len() + payload.len());
    content.extend_from_slice(&(manifest_text.len() as u32).to_be_bytes());
    content.extend_from_slice(manifest_text.as_bytes());
    content.extend_from_slice(payload);
    content
}

/// The signature section (count and entries).
pub fn encode_signatures(signatures: &[Signature]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(signatures.len() as u16).to_be_bytes());
    for signature in signatures {
        out.push(signature.key_id.len() as u8);
        out.extend_from_slice(signature.key_id.as_bytes());
        out.extend_from_slice(&signature.signed_at_ms.to_be_bytes());
        out.extend_from_slice(&signature.expires_at_ms.unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&signature.bytes);
    }
    out
}

/// Write a whole artifact from its content and signatures.
pub fn write_artifact<W: Write>(
    out: &mut W,
    content: &[u8],
    signatures: &[Signature],
) -> std::io::Result<()> {
    let mut writer = ArtifactWriter::new(out, content.len() as u64)?;
    writer.write_content(content)?;
    writer.finish_raw(signatures).map(drop)
}

/// Writes a `.hsm` file while its content arrives, in one pass: every
/// content byte is written once and hashed once, for the digest (which the
/// trailer covers), and the manifest is kept aside so
/// [`ArtifactWriter::finish`] can describe the artifact without reading the
/// file back.
///
/// A writer can also pick up a file cut short by an interrupted transfer
/// ([`ArtifactWriter::resume`]): the bytes already there are hashed once and
/// writing continues after them.
pub struct ArtifactWriter<W> {
    out: W,
    content_len: u64,
    written: u64,
    digest: Sha256,
    trailer: Sha256,
    /// The first content bytes: the manifest length, then the manifest.
    head: Vec<u8>,
}

/// Bytes of `content` a writer keeps aside: the length prefix and at most
/// the longest manifest allowed.
const HEAD_CAP: usize = 4 + MAX_MANIFEST_BYTES as usize;

impl<W: Write> ArtifactWriter<W> {
    /// Start a file of `content_len` content bytes: writes the header.
    pub fn new(mut out: W, content_len: u64) -> std::io::Result<Self> {
        out.write_all(&header(content_len))?;
        Ok(Self::after_header(out, content_len))
    }

    /// A writer whose output already holds the header for `content_len`.
    fn after_header(out: W, content_len: u64) -> Self {
        let mut trailer = Sha256::new();
        trailer.update(header(content_len));
        Self {
            out,
            content_len,
            written: 0,
            digest: Sha256::new(),
            trailer,
            head: Vec::new(),
        }
    }

    /// Continue a file whose first bytes, read from `existing`, are a header
    /// for `content_len` followed by a prefix of the content; `out` must
    /// append after them. `None` when `existing` is not such a file (another
    /// length, or longer than header and content), so the caller starts over.
    pub fn resume<R: Read>(
        out: W,
        mut existing: R,
        content_len: u64,
    ) -> std::io::Result<Option<Self>> {
        let mut found = [0u8; CONTENT_OFFSET as usize];
        match existing.read_exact(&mut found) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        if found != header(content_len) {
            return Ok(None);
        }
        let mut writer = Self::after_header(out, content_len);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = existing.read(&mut buf)?;
            if n == 0 {
                return Ok(Some(writer));
            }
            if !writer.absorb(&buf[..n]) {
                return Ok(None);
            }
        }
    }

    /// Content bytes written so far (including any resumed prefix).
    pub fn content_written(&self) -> u64 {
        self.written
    }

    /// The output, for flushing what was written before giving up.
    pub fn output(&mut self) -> &mut W {
        &mut self.out
    }

    /// Hash and keep aside; false when `bytes` would pass the announced length.
    fn absorb(&mut self, bytes: &[u8]) -> bool {
        if bytes.len() as u64 > self.content_len - self.written {
            return false;
        }
        self.digest.update(bytes);
        if self.head.len() < HEAD_CAP {
            let wanted = match self.head.first_chunk::<4>() {
                Some(len) => (4 + u32::from_be_bytes(*len) as usize).min(HEAD_CAP),
                None => HEAD_CAP,
            };
            let take = wanted.saturating_sub(self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..take]);
            // The length prefix may have just arrived: trim to the manifest.
            if let Some(len) = self.head.first_chunk::<4>() {
                let wanted = (4 + u32::from_be_bytes(*len) as usize).min(HEAD_CAP);
                self.head.truncate(wanted.max(4));
            }
        }
        self.written += bytes.len() as u64;
        true
    }

    /// Append content bytes; refuses bytes beyond the announced length.
    pub fn write_content(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if !self.absorb(bytes) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} more content bytes than the announced {}",
                    self.written + bytes.len() as u64 - self.content_len,
                    self.content_len
                ),
            ));
        }
        self.out.write_all(bytes)
    }

    /// Complete the file: signatures, then the trailer. Returns the output
    /// and the content's digest.
    fn finish_raw(mut self, signatures: &[Signature]) -> std::io::Result<(W, Digest)> {
        if self.written != self.content_len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "content ended at byte {} of {}",
                    self.written, self.content_len
                ),
            ));
        }
        let digest = Digest(self.digest.finalize().into());
        self.trailer.update(digest.0);
        let encoded = encode_signatures(signatures);
        self.trailer.update(&encoded);
        self.out.write_all(&encoded)?;
        self.out.write_all(&self.trailer.finalize())?;
        Ok((self.out, digest))
    }

    /// Complete the file and describe it as [`read_artifact`] would, from
    /// what went through the writer: nothing is read back. On an error the
    /// output holds a file nobody should use.
    pub fn finish(
        mut self,
        signatures: Vec<Signature>,
    ) -> Result<(W, ArtifactInfo), ArtifactError> {
        let (content_len, head) = (self.content_len, std::mem::take(&mut self.head));
        let (out, digest) = self
            .finish_raw(&signatures)
            .map_err(|e| format_err(format!("cannot write the artifact: {e}")))?;
        let info = describe(&head, digest, signatures, content_len)?;
        Ok((out, info))
    }
}

/// Write the real header for `content_len` at the start of `file`, whose
/// content (hashing to `digest`) was written behind a placeholder, and
/// answer the trailer's hash state after header and content. Nothing is
/// read back: the trailer covers the content through its digest.
pub(super) fn patch_header(
    file: &mut File,
    content_len: u64,
    digest: &Digest,
) -> std::io::Result<Sha256> {
    file.seek(SeekFrom::Start(0))?;
    let header = header(content_len);
    file.write_all(&header)?;
    let mut prefix = Sha256::new();
    prefix.update(header);
    prefix.update(digest.0);
    Ok(prefix)
}

/// The trailer a whole file's bytes before it (`body`) call for, by the
/// rules of the version its magic names: for tools that edit a file on
/// purpose (tests, fuzzing) and must get past the integrity check.
/// `None` when `body` is too short or its header announces more content
/// than it holds (no reader gets as far as the trailer then).
pub fn trailer_for(body: &[u8]) -> Option<[u8; 32]> {
    let (head, rest) = body.split_first_chunk::<{ CONTENT_OFFSET as usize }>()?;
    if head[..8] != MAGIC[..] {
        return Some(Sha256::digest(body).into());
    }
    let content_len = usize::try_from(u64::from_be_bytes(head[8..].try_into().ok()?)).ok()?;
    let content = rest.get(..content_len)?;
    let mut trailer = Sha256::new();
    trailer.update(head);
    trailer.update(Sha256::digest(content));
    trailer.update(&rest[content_len..]);
    Some(trailer.finalize().into())
}

/// Replace whatever follows the content of `file` (a `.hsm` file, or one
/// being written, whose header and `content_len` content bytes are in
/// place) with `signatures` and the trailer. `prefix` is the trailer's hash
/// state after header and content ([`patch_header`] or
/// [`read_artifact_and_prefix`]), which keeps a version 1 file version 1. Nothing of the content is read or held.
pub(super) fn write_tail(
    file: &mut File,
    content_len: u64,
    mut prefix: Sha256,
    signatures: &[Signature],
) -> std::io::Result<()> {
    let end = CONTENT_OFFSET + content_len;
    file.set_len(end)?;
    file.seek(SeekFrom::Start(end))?;
    let encoded = encode_signatures(signatures);
    prefix.update(&encoded);
    file.write_all(&encoded)?;
    file.write_all(&prefix.finalize())?;
    Ok(())
}

/// The first bytes of a `.hsm` file with `content_len` content bytes.
fn header(content_len: u64) -> [u8; CONTENT_OFFSET as usize] {
    let mut header = [0u8; CONTENT_OFFSET as usize];
    header[..8].copy_from_slice(MAGIC);
    header[8..].copy_from_slice(&content_len.to_be_bytes());
    header
}

/// Read the content section of an artifact file into memory.
pub fn read_content(path: &Path, info: &ArtifactInfo) -> Result<Vec<u8>, ArtifactError> {
    let io = |source| ArtifactError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    file.seek(SeekFrom::Start(info.content_offset))
        .map_err(io)?;
    let mut content = vec![0u8; info.content_len as usize];
    file.read_exact(&mut content).map_err(io)?;
    Ok(content)
}
