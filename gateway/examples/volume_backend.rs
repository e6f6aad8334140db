//! A backend for the volume viewer (`/volume`): builds the 3D Shepp–Logan phantom
//! (256 × 256 × 128 voxels) once and answers the gateway's RPC calls:
//!
//! - `POST /volume.slice` with a slice index (decimal text) → that axial slice as a PNG;
//! - `POST /volume.info` → `{"width":256,"height":256,"depth":128}`.
//!
//! ```sh
//! cargo run --release --example volume_backend                 # listens on 127.0.0.1:9000
//! cargo run --release -p gateway -- --rpc-url http://127.0.0.1:9000
//! ```
//!
//! Then open http://127.0.0.1:8080/volume. `--listen ADDR` picks another address.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
};

const WIDTH: usize = 256;
const HEIGHT: usize = 256;
const DEPTH: usize = 128;

/// The modified 3D Shepp–Logan phantom: per ellipsoid its intensity, semi-axes
/// (a, b, c), centre (x, y, z) and rotation about z (degrees), in [-1, 1] coordinates.
const ELLIPSOIDS: [(f32, [f32; 3], [f32; 3], f32); 10] = [
    (1.0, [0.69, 0.92, 0.81], [0.0, 0.0, 0.0], 0.0),
    (-0.8, [0.6624, 0.874, 0.78], [0.0, -0.0184, 0.0], 0.0),
    (-0.2, [0.11, 0.31, 0.22], [0.22, 0.0, 0.0], -18.0),
    (-0.2, [0.16, 0.41, 0.28], [-0.22, 0.0, 0.0], 18.0),
    (0.1, [0.21, 0.25, 0.41], [0.0, 0.35, -0.15], 0.0),
    (0.1, [0.046, 0.046, 0.05], [0.0, 0.1, 0.25], 0.0),
    (0.1, [0.046, 0.046, 0.05], [0.0, -0.1, 0.25], 0.0),
    (0.1, [0.046, 0.023, 0.05], [-0.08, -0.605, 0.0], 0.0),
    (0.1, [0.023, 0.023, 0.02], [0.0, -0.606, 0.0], 0.0),
    (0.1, [0.023, 0.046, 0.02], [0.06, -0.605, 0.0], 0.0),
];

/// Voxel intensities, x fastest then y then z, windowed to 0–255 (0.5 and above white).
fn phantom() -> Vec<u8> {
    let mut density = vec![0f32; WIDTH * HEIGHT * DEPTH];
    let coord = |i: usize, n: usize| (2.0 * i as f32 + 1.0) / n as f32 - 1.0;
    for &(value, [a, b, c], [x0, y0, z0], phi) in &ELLIPSOIDS {
        let (sin, cos) = phi.to_radians().sin_cos();
        let r = a.max(b).max(c);
        // Only the voxels within the ellipsoid's bounding box.
        let span = |centre: f32, n: usize| {
            let lo = (((centre - r + 1.0) * n as f32 / 2.0).floor().max(0.0)) as usize;
            let hi = (((centre + r + 1.0) * n as f32 / 2.0).ceil() as usize).min(n);
            lo..hi
        };
        for z in span(z0, DEPTH) {
            let dz = (coord(z, DEPTH) - z0) / c;
            for y in span(-y0, HEIGHT) {
                for x in span(x0, WIDTH) {
                    // Image rows go down; the phantom's y axis goes up.
                    let (px, py) = (coord(x, WIDTH) - x0, -coord(y, HEIGHT) - y0);
                    let (u, v) = ((px * cos + py * sin) / a, (-px * sin + py * cos) / b);
                    if u * u + v * v + dz * dz <= 1.0 {
                        density[(z * HEIGHT + y) * WIDTH + x] += value;
                    }
                }
            }
        }
    }
    density
        .into_iter()
        .map(|d| (d / 0.5 * 255.0).clamp(0.0, 255.0) as u8)
        .collect()
}

struct Volume {
    voxels: Vec<u8>,
    /// Encoded slices, made on first request.
    slices: Mutex<Vec<Option<Bytes>>>,
}

impl Volume {
    fn slice_png(&self, z: usize) -> Bytes {
        if let Some(png) = &self.slices.lock().unwrap()[z] {
            return png.clone();
        }
        let plane = &self.voxels[z * WIDTH * HEIGHT..(z + 1) * WIDTH * HEIGHT];
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, WIDTH as u32, HEIGHT as u32);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().expect("png header");
        writer.write_image_data(plane).expect("png data");
        writer.finish().expect("png end");
        let png = Bytes::from(out);
        self.slices.lock().unwrap()[z] = Some(png.clone());
        png
    }
}

async fn answer(volume: Arc<Volume>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let reply = |status: StatusCode, content_type: &str, body: Bytes| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(body))
            .expect("response")
    };
    match path.as_str() {
        "/volume.slice" => {
            let index = std::str::from_utf8(&body)
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok());
            match index {
                Some(z) if z < DEPTH => reply(StatusCode::OK, "image/png", volume.slice_png(z)),
                _ => reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    Bytes::from(format!("the body is a slice index, 0 to {}\n", DEPTH - 1)),
                ),
            }
        }
        "/volume.info" => reply(
            StatusCode::OK,
            "application/json",
            Bytes::from(format!(
                r#"{{"width":{WIDTH},"height":{HEIGHT},"depth":{DEPTH}}}"#
            )),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"no such method\n"),
        ),
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let listen = args
        .iter()
        .position(|a| a == "--listen")
        .and_then(|i| args.get(i + 1))
        .map_or("127.0.0.1:9000", String::as_str);
    let started = std::time::Instant::now();
    let volume = Arc::new(Volume {
        voxels: phantom(),
        slices: Mutex::new(vec![None; DEPTH]),
    });
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!(
        "volume backend: {WIDTH}x{HEIGHT}x{DEPTH} Shepp-Logan phantom built in {:.1}s; listening on {}",
        started.elapsed().as_secs_f64(),
        listener.local_addr()?
    );
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let volume = volume.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let volume = volume.clone();
                async move { Ok::<_, Infallible>(answer(volume, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
