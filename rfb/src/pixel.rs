//! The 16-byte `PIXEL_FORMAT` (RFC 6143 section 7.4) and packing an RGB colour into it.

use crate::{RfbError, be16};

/// How a pixel is laid out on the wire. Only true-colour formats are modelled for packing;
/// colour-map formats decode fine but [`PixelFormat::check_packable`] rejects them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelFormat {
    pub bits_per_pixel: u8,
    pub depth: u8,
    pub big_endian: bool,
    pub true_colour: bool,
    pub red_max: u16,
    pub green_max: u16,
    pub blue_max: u16,
    pub red_shift: u8,
    pub green_shift: u8,
    pub blue_shift: u8,
}

impl PixelFormat {
    /// 32 bpp, depth 24, little-endian, `0x00RRGGBB`: what the fake VM announces (and what
    /// x11vnc announces on a 24-bit X display).
    pub const BGRX_LE: PixelFormat = PixelFormat {
        bits_per_pixel: 32,
        depth: 24,
        big_endian: false,
        true_colour: true,
        red_max: 255,
        green_max: 255,
        blue_max: 255,
        red_shift: 16,
        green_shift: 8,
        blue_shift: 0,
    };

    /// 32 bpp, depth 24, little-endian, `0x00BBGGRR`: what noVNC asks for with SetPixelFormat.
    pub const RGBX_LE: PixelFormat = PixelFormat {
        red_shift: 0,
        blue_shift: 16,
        ..Self::BGRX_LE
    };

    /// The 16 wire bytes (3 of them padding).
    pub fn to_bytes(&self) -> [u8; 16] {
        let [rm0, rm1] = self.red_max.to_be_bytes();
        let [gm0, gm1] = self.green_max.to_be_bytes();
        let [bm0, bm1] = self.blue_max.to_be_bytes();
        [
            self.bits_per_pixel,
            self.depth,
            u8::from(self.big_endian),
            u8::from(self.true_colour),
            rm0,
            rm1,
            gm0,
            gm1,
            bm0,
            bm1,
            self.red_shift,
            self.green_shift,
            self.blue_shift,
            0,
            0,
            0,
        ]
    }

    /// Parses the 16 wire bytes. Any non-zero flag byte counts as true (RFC 6143 7.4).
    pub fn from_bytes(b: &[u8; 16]) -> PixelFormat {
        PixelFormat {
            bits_per_pixel: b[0],
            depth: b[1],
            big_endian: b[2] != 0,
            true_colour: b[3] != 0,
            red_max: be16(b, 4),
            green_max: be16(b, 6),
            blue_max: be16(b, 8),
            red_shift: b[10],
            green_shift: b[11],
            blue_shift: b[12],
        }
    }

    /// Bytes one pixel takes on the wire.
    pub fn bytes_per_pixel(&self) -> usize {
        usize::from(self.bits_per_pixel).div_ceil(8)
    }

    /// Whether [`PixelFormat::pack`] can produce this format: true colour at 8, 16 or 32 bpp
    /// with every channel inside the pixel. RFC 6143 allows only those three sizes.
    pub fn check_packable(&self) -> Result<(), RfbError> {
        let bits = u32::from(self.bits_per_pixel);
        let fits =
            |max: u16, shift: u8| max != 0 && u32::from(shift) + (16 - max.leading_zeros()) <= bits;
        let ok = self.true_colour
            && matches!(self.bits_per_pixel, 8 | 16 | 32)
            && fits(self.red_max, self.red_shift)
            && fits(self.green_max, self.green_shift)
            && fits(self.blue_max, self.blue_shift);
        if ok {
            Ok(())
        } else {
            Err(RfbError::UnsupportedPixelFormat(*self))
        }
    }

    /// Appends one pixel of colour (r, g, b), each 0..=255, in this format.
    /// The format must have passed [`PixelFormat::check_packable`].
    #[inline]
    pub fn pack(&self, r: u8, g: u8, b: u8, out: &mut Vec<u8>) {
        // The two formats nearly every session uses (the server's own and noVNC's) skip the
        // general path: this runs once per pixel of every update.
        if *self == Self::BGRX_LE {
            out.extend_from_slice(&[b, g, r, 0]);
            return;
        }
        if *self == Self::RGBX_LE {
            out.extend_from_slice(&[r, g, b, 0]);
            return;
        }
        let scale = |c: u8, max: u16| u32::from(c) * u32::from(max) / 255;
        let v = (scale(r, self.red_max) << self.red_shift)
            | (scale(g, self.green_max) << self.green_shift)
            | (scale(b, self.blue_max) << self.blue_shift);
        match (self.bits_per_pixel, self.big_endian) {
            (8, _) => out.push(v as u8),
            (16, false) => out.extend_from_slice(&(v as u16).to_le_bytes()),
            (16, true) => out.extend_from_slice(&(v as u16).to_be_bytes()),
            (_, false) => out.extend_from_slice(&v.to_le_bytes()),
            (_, true) => out.extend_from_slice(&v.to_be_bytes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_bytes_round_trip() {
        let b = PixelFormat::BGRX_LE.to_bytes();
        assert_eq!(b, [32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]);
        assert_eq!(PixelFormat::from_bytes(&b), PixelFormat::BGRX_LE);
        let n = PixelFormat::RGBX_LE.to_bytes();
        assert_eq!(PixelFormat::from_bytes(&n), PixelFormat::RGBX_LE);
    }

    #[test]
    fn packs_each_layout() {
        let mut out = Vec::new();
        PixelFormat::BGRX_LE.pack(0x11, 0x22, 0x33, &mut out);
        assert_eq!(out, [0x33, 0x22, 0x11, 0]);

        out.clear();
        let be = PixelFormat {
            big_endian: true,
            ..PixelFormat::BGRX_LE
        };
        be.pack(0x11, 0x22, 0x33, &mut out);
        assert_eq!(out, [0, 0x11, 0x22, 0x33]);

        out.clear();
        PixelFormat::RGBX_LE.pack(0x11, 0x22, 0x33, &mut out);
        assert_eq!(out, [0x11, 0x22, 0x33, 0]);

        // RGB565 little-endian: white is 0xffff, pure red is 0xf800.
        let rgb565 = PixelFormat {
            bits_per_pixel: 16,
            depth: 16,
            big_endian: false,
            true_colour: true,
            red_max: 31,
            green_max: 63,
            blue_max: 31,
            red_shift: 11,
            green_shift: 5,
            blue_shift: 0,
        };
        rgb565.check_packable().unwrap();
        out.clear();
        rgb565.pack(255, 255, 255, &mut out);
        rgb565.pack(255, 0, 0, &mut out);
        assert_eq!(out, [0xff, 0xff, 0x00, 0xf8]);
    }

    #[test]
    fn rejects_unpackable() {
        let colour_map = PixelFormat {
            true_colour: false,
            ..PixelFormat::BGRX_LE
        };
        assert!(colour_map.check_packable().is_err());
        let bpp24 = PixelFormat {
            bits_per_pixel: 24,
            ..PixelFormat::BGRX_LE
        };
        assert!(bpp24.check_packable().is_err());
        let overflow = PixelFormat {
            red_shift: 28,
            ..PixelFormat::BGRX_LE
        };
        assert!(overflow.check_packable().is_err());
        PixelFormat::BGRX_LE.check_packable().unwrap();
    }
}
