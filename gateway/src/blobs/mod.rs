//! Images as first-class binary: what a blob is (a content-addressed byte string, its id
//! the lowercase hex SHA-256 of the bytes), which image types are recognised and how
//! (magic numbers and header dimensions, via `imagesize`, without decoding pixels), how
//! uploads are assembled ([`upload`]) and how download URLs are signed ([`signing`]).
//! Where blobs are stored is the broker's business (`broker::blobs`).

pub mod lru;
pub mod signing;
pub mod upload;

use sha2::{Digest, Sha256};
use std::fmt;

/// A blob's id: 64 lowercase hex digits, the SHA-256 of its bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a blob id is 64 lowercase hex digits")]
pub struct BadBlobId;

impl BlobId {
    pub fn parse(s: &str) -> Result<Self, BadBlobId> {
        if s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(Self(s.to_owned()))
        } else {
            Err(BadBlobId)
        }
    }

    /// The id of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_digest(&Sha256::digest(bytes)[..])
    }

    pub fn from_digest(digest: &[u8]) -> Self {
        use std::fmt::Write;
        let mut hex = String::with_capacity(64);
        for b in digest {
            let _ = write!(hex, "{b:02x}");
        }
        Self(hex)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({})", &self.0[..12])
    }
}

/// The image types the gateway recognises by their bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageKind {
    Jpeg,
    Png,
    Gif,
    Webp,
    Avif,
    Heic,
    Bmp,
    Tiff,
    Ico,
}

impl ImageKind {
    pub const ALL: [Self; 9] = [
        Self::Jpeg,
        Self::Png,
        Self::Gif,
        Self::Webp,
        Self::Avif,
        Self::Heic,
        Self::Bmp,
        Self::Tiff,
        Self::Ico,
    ];

    pub fn mime(self) -> &'static str {
        match self {
            Self::Jpeg => "image/jpeg",
            Self::Png => "image/png",
            Self::Gif => "image/gif",
            Self::Webp => "image/webp",
            Self::Avif => "image/avif",
            Self::Heic => "image/heic",
            Self::Bmp => "image/bmp",
            Self::Tiff => "image/tiff",
            Self::Ico => "image/vnd.microsoft.icon",
        }
    }

    /// The kind a `Content-Type` names (`image/jpg` and parameters accepted).
    pub fn from_mime(mime: &str) -> Option<Self> {
        let mime = mime
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match mime.as_str() {
            "image/jpg" | "image/pjpeg" => Some(Self::Jpeg),
            "image/x-icon" => Some(Self::Ico),
            "image/heif" => Some(Self::Heic),
            _ => Self::ALL.into_iter().find(|k| k.mime() == mime),
        }
    }

    /// Sniffs the kind from the first bytes of a file (magic numbers).
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        use imagesize::{Compression, ImageType};
        match imagesize::image_type(bytes).ok()? {
            ImageType::Jpeg => Some(Self::Jpeg),
            ImageType::Png => Some(Self::Png),
            ImageType::Gif => Some(Self::Gif),
            ImageType::Webp => Some(Self::Webp),
            ImageType::Heif(Compression::Av1) => Some(Self::Avif),
            ImageType::Heif(_) => Some(Self::Heic),
            ImageType::Bmp => Some(Self::Bmp),
            ImageType::Tiff => Some(Self::Tiff),
            ImageType::Ico => Some(Self::Ico),
            _ => None,
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// Width and height from the image header, when it says.
pub fn dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    let size = imagesize::blob_size(bytes).ok()?;
    Some((
        u32::try_from(size.width).ok()?,
        u32::try_from(size.height).ok()?,
    ))
}

/// A set of allowed image kinds (small and `Copy`, so namespace options stay `Copy`);
/// written in config as a list of MIME types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "Vec<String>")]
pub struct KindSet(u16);

impl TryFrom<Vec<String>> for KindSet {
    type Error = String;

    fn try_from(mimes: Vec<String>) -> Result<Self, String> {
        Self::parse(&mimes).map_err(|m| format!("unknown image type {m:?}"))
    }
}

impl KindSet {
    /// JPEG, PNG, GIF, WebP and AVIF: what DESIGN.md allows by default.
    pub const DEFAULT: Self = Self(
        (1 << ImageKind::Jpeg as u16)
            | (1 << ImageKind::Png as u16)
            | (1 << ImageKind::Gif as u16)
            | (1 << ImageKind::Webp as u16)
            | (1 << ImageKind::Avif as u16),
    );

    /// Parses a list of MIME types; an unknown one is an error (it names it).
    pub fn parse<S: AsRef<str>>(mimes: &[S]) -> Result<Self, String> {
        let mut set = 0;
        for m in mimes {
            let kind = ImageKind::from_mime(m.as_ref()).ok_or_else(|| m.as_ref().to_owned())?;
            set |= kind.bit();
        }
        Ok(Self(set))
    }

    pub fn contains(self, kind: ImageKind) -> bool {
        self.0 & kind.bit() != 0
    }

    pub fn mimes(self) -> Vec<&'static str> {
        ImageKind::ALL
            .into_iter()
            .filter(|k| self.contains(*k))
            .map(ImageKind::mime)
            .collect()
    }
}

impl Default for KindSet {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What is known about a stored blob besides its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlobMeta {
    pub size: u64,
    pub content_type: String,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TypeError {
    #[error("not an image type the gateway recognises")]
    Unknown,
    #[error("the bytes are {sniffed}, not the claimed {claimed}")]
    Mismatch {
        claimed: &'static str,
        sniffed: &'static str,
    },
    #[error("{0} is not allowed here")]
    NotAllowed(&'static str),
}

/// Checks `bytes` against the claimed content type and the allowlist; returns the
/// sniffed kind.
pub fn check_type(bytes: &[u8], claimed: &str, allowed: KindSet) -> Result<ImageKind, TypeError> {
    let sniffed = ImageKind::sniff(bytes).ok_or(TypeError::Unknown)?;
    if let Some(claimed) = ImageKind::from_mime(claimed)
        && claimed != sniffed
    {
        return Err(TypeError::Mismatch {
            claimed: claimed.mime(),
            sniffed: sniffed.mime(),
        });
    }
    if ImageKind::from_mime(claimed).is_none() && !claimed.is_empty() {
        return Err(TypeError::Mismatch {
            claimed: "another type",
            sniffed: sniffed.mime(),
        });
    }
    if !allowed.contains(sniffed) {
        return Err(TypeError::NotAllowed(sniffed.mime()));
    }
    Ok(sniffed)
}

/// Checks a stored blob's type (as its meta records it) for use in a namespace, and
/// against the type a client claims for it (empty: none).
pub fn check_stored_type(
    stored: &str,
    claimed: &str,
    allowed: KindSet,
) -> Result<ImageKind, TypeError> {
    let kind = ImageKind::from_mime(stored).ok_or(TypeError::Unknown)?;
    if !claimed.is_empty() && ImageKind::from_mime(claimed) != Some(kind) {
        return Err(TypeError::Mismatch {
            claimed: ImageKind::from_mime(claimed).map_or("another type", ImageKind::mime),
            sniffed: kind.mime(),
        });
    }
    if !allowed.contains(kind) {
        return Err(TypeError::NotAllowed(kind.mime()));
    }
    Ok(kind)
}

#[cfg(test)]
pub mod samples {
    //! Tiny real images for tests: headers are what `imagesize` reads.

    /// A 1×1 PNG.
    pub const PNG_1X1: &[u8] = &[
        0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44,
        0x52, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f,
        0x15, 0xc4, 0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x00,
        0x01, 0x00, 0x00, 0x05, 0x00, 0x01, 0x0d, 0x0a, 0x2d, 0xb4, 0x00, 0x00, 0x00, 0x00, 0x49,
        0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
    ];

    /// A 3×2 GIF header and trailer.
    pub const GIF_3X2: &[u8] = b"GIF89a\x03\x00\x02\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00;";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_the_sha256_in_lowercase_hex() {
        let id = BlobId::of(b"abc");
        assert_eq!(
            id.as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(BlobId::parse(id.as_str()), Ok(id.clone()));
        assert!(BlobId::parse(&id.as_str().to_uppercase()).is_err());
        assert!(BlobId::parse("abc").is_err());
        assert!(BlobId::parse(&"g".repeat(64)).is_err());
    }

    #[test]
    fn sniffs_types_and_reads_dimensions() {
        assert_eq!(ImageKind::sniff(samples::PNG_1X1), Some(ImageKind::Png));
        assert_eq!(dimensions(samples::PNG_1X1), Some((1, 1)));
        assert_eq!(ImageKind::sniff(samples::GIF_3X2), Some(ImageKind::Gif));
        assert_eq!(dimensions(samples::GIF_3X2), Some((3, 2)));
        assert_eq!(ImageKind::sniff(b"<html>not an image</html>"), None);
        assert_eq!(
            ImageKind::from_mime("image/JPG; q=1"),
            Some(ImageKind::Jpeg)
        );
    }

    #[test]
    fn checks_the_claimed_type_and_the_allowlist() {
        let all = KindSet::DEFAULT;
        assert_eq!(
            check_type(samples::PNG_1X1, "image/png", all),
            Ok(ImageKind::Png)
        );
        assert_eq!(check_type(samples::PNG_1X1, "", all), Ok(ImageKind::Png));
        assert!(matches!(
            check_type(samples::PNG_1X1, "image/jpeg", all),
            Err(TypeError::Mismatch { .. })
        ));
        assert!(matches!(
            check_type(samples::PNG_1X1, "text/html", all),
            Err(TypeError::Mismatch { .. })
        ));
        assert_eq!(
            check_type(b"#!/bin/sh\nrm -rf /", "image/png", all),
            Err(TypeError::Unknown)
        );
        let jpeg_only = KindSet::parse(&["image/jpeg"]).unwrap();
        assert_eq!(
            check_type(samples::PNG_1X1, "image/png", jpeg_only),
            Err(TypeError::NotAllowed("image/png"))
        );
        assert_eq!(KindSet::parse(&["text/html"]), Err("text/html".to_owned()));
        assert_eq!(
            KindSet::DEFAULT.mimes(),
            vec![
                "image/jpeg",
                "image/png",
                "image/gif",
                "image/webp",
                "image/avif"
            ]
        );
    }
}
