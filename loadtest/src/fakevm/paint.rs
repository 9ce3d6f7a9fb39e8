//! What the fake VM's screen looks like at frame `n`: pure functions of (x, y, frame), so a
//! client sees a moving picture without the server keeping a framebuffer per session.

use vncgate_rfb::PixelFormat;

use super::Payload;

/// Colour bars (SMPTE-ish) behind the `raw` pattern.
const BARS: [(u8, u8, u8); 8] = [
    (235, 235, 235),
    (235, 235, 16),
    (16, 235, 235),
    (16, 235, 16),
    (235, 16, 235),
    (235, 16, 16),
    (16, 16, 235),
    (16, 16, 16),
];

/// Paints rows of the screen into a pixel format. Holds only the PRNG state for the
/// `incompressible` payload.
#[derive(Debug, Clone)]
pub struct Painter {
    payload: Payload,
    screen_w: u32,
    screen_h: u32,
    rng: u64,
}

impl Painter {
    /// `seed` feeds the xorshift generator behind `incompressible` (zero is remapped: xorshift
    /// never leaves the all-zero state).
    pub fn new(payload: Payload, screen_w: u16, screen_h: u16, seed: u64) -> Painter {
        Painter {
            payload,
            screen_w: u32::from(screen_w.max(1)),
            screen_h: u32::from(screen_h.max(1)),
            rng: seed | 1,
        }
    }

    /// Appends one row: pixels `x..x+width` of screen row `y` at `frame`, in `pf`.
    pub fn paint_row(
        &mut self,
        pf: &PixelFormat,
        x: u16,
        width: u16,
        y: u16,
        frame: u64,
        out: &mut Vec<u8>,
    ) {
        let (y, t) = (u32::from(y), frame as u32);
        match self.payload {
            Payload::Incompressible => {
                // Any bit pattern is a valid true-colour pixel, so fill bytes directly.
                let n = usize::from(width) * pf.bytes_per_pixel();
                let start = out.len();
                out.resize(start + n, 0);
                for chunk in out[start..].chunks_mut(8) {
                    let v = self.next_u64().to_le_bytes();
                    chunk.copy_from_slice(&v[..chunk.len()]);
                }
            }
            Payload::Compressible => {
                // One flat colour per frame plus a grid: long runs of equal bytes.
                let hue = (t.wrapping_mul(3) & 0xff) as u8;
                for x in u32::from(x)..u32::from(x) + u32::from(width) {
                    if x % 64 == 0 || y % 64 == 0 {
                        pf.pack(255, 255, 255, out);
                    } else {
                        pf.pack(hue, 96, 255 - hue, out);
                    }
                }
            }
            Payload::Raw => {
                // Bars sliding sideways, shaded top to bottom, with a diagonal ripple:
                // obviously alive in a browser, and different in every frame.
                let shade = 255 - y * 160 / self.screen_h;
                for x in u32::from(x)..u32::from(x) + u32::from(width) {
                    let shifted = (x + t.wrapping_mul(8)) % self.screen_w;
                    let (r, g, b) = BARS[(shifted * 8 / self.screen_w) as usize];
                    let ripple = ((x + y + t.wrapping_mul(4)) & 63) as u8;
                    let c = |v: u8| ((u32::from(v) * shade / 255) as u8).wrapping_add(ripple);
                    pf.pack(c(r), c(g), c(b), out);
                }
            }
        }
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64*: fast and good enough to defeat a compressor; not for secrets.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_have_the_right_size_and_change_per_frame() {
        for payload in [Payload::Raw, Payload::Compressible, Payload::Incompressible] {
            let mut p = Painter::new(payload, 100, 50, 42);
            let mut a = Vec::new();
            let mut b = Vec::new();
            p.paint_row(&PixelFormat::BGRX_LE, 3, 17, 5, 1, &mut a);
            p.paint_row(&PixelFormat::BGRX_LE, 3, 17, 5, 2, &mut b);
            assert_eq!(a.len(), 17 * 4);
            assert_eq!(b.len(), 17 * 4);
            assert_ne!(a, b, "{payload:?}");
        }
    }
}
