// PNG/JPEG decoding and Pillow-exact bicubic resizing (see image.h).
#include "image.h"

#include <csetjmp>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>

#include <jpeglib.h>

#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_PNG
#define STBI_NO_STDIO
#include <stb/stb_image.h>

namespace pgedge {
namespace {

constexpr uintmax_t kMaxImageBytes = 1ull << 30;

// A regular file only (a FIFO would block, /dev/zero never ends), of at most kMaxImageBytes,
// checked before it is opened.
std::vector<uint8_t> read_file(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) throw std::runtime_error("image not found: " + path);
  if (!std::filesystem::is_regular_file(path, ec))
    throw std::runtime_error("cannot read image " + path + ": not a regular file (a FIFO, device or folder?)");
  uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec || size > kMaxImageBytes)
    throw std::runtime_error("cannot read image " + path + ": " + (ec ? ec.message() : "larger than 1 GiB"));
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read image " + path);
  std::vector<uint8_t> data(static_cast<size_t>(size));
  f.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(size));
  if (static_cast<uintmax_t>(f.gcount()) != size) throw std::runtime_error("cannot read image " + path + ": it changed while being read");
  return data;
}

// Pillow's AlphaComposite.c with a white, opaque destination: out = src over white.
uint8_t over_white(uint32_t c, uint32_t a) {
  if (a == 0) return 255;
  constexpr int PB = 7;
  auto div255 = [](uint32_t v) { return ((v >> 8) + v) >> 8; };
  uint32_t blend = 255 * (255 - a);
  uint32_t outa255 = a * 255 + blend;
  uint32_t coef1 = a * 255 * 255 * (1u << PB) / outa255;
  uint32_t coef2 = 255 * (1u << PB) - coef1;
  uint32_t t = c * coef1 + 255 * coef2;
  return static_cast<uint8_t>(div255(t + (0x80u << PB)) >> PB);
}

// pg_edge.inputs.images's pixel limit (PG_EDGE_MAX_IMAGE_PIXELS, default 100 million), checked
// from the header before any pixel is decoded.
void check_pixels(long long w, long long h, const std::string& path) {
  const char* env = std::getenv("PG_EDGE_MAX_IMAGE_PIXELS");
  long long limit = env && *env ? std::atoll(env) : 100000000LL;
  if (w < 1 || h < 1) throw std::runtime_error("image " + path + " is empty");
  if (w * h > limit)
    throw std::runtime_error("image " + path + " is " + std::to_string(w) + "x" + std::to_string(h) +
                             " pixels, past the limit of " + std::to_string(limit));
}

RgbImage decode_png(const std::vector<uint8_t>& data, const std::string& path) {
  int w = 0, h = 0, n = 0;
  int len = static_cast<int>(data.size());
  if (!stbi_info_from_memory(data.data(), len, &w, &h, &n))
    throw std::runtime_error("cannot read image " + path + ": " + stbi_failure_reason());
  check_pixels(w, h, path);
  RgbImage img{w, h, std::vector<uint8_t>(static_cast<size_t>(w) * h * 3)};
  size_t count = static_cast<size_t>(w) * h;
  if (stbi_is_16_bit_from_memory(data.data(), len) && n == 1) {
    // 16-bit grey: Pillow's I;16, which pg_edge scales to 8 bits as round(v / 257).
    uint16_t* px = stbi_load_16_from_memory(data.data(), len, &w, &h, &n, 1);
    if (!px) throw std::runtime_error("cannot read image " + path + ": " + stbi_failure_reason());
    for (size_t i = 0; i < count; ++i)
      img.rgb[3 * i] = img.rgb[3 * i + 1] = img.rgb[3 * i + 2] = static_cast<uint8_t>((2u * px[i] + 257u) / 514u);
    stbi_image_free(px);
    return img;
  }
  // Other 16-bit PNGs: the high byte, as Pillow's RGB;16B / LA;16B unpacking (and stb) keep.
  uint8_t* px = stbi_load_from_memory(data.data(), len, &w, &h, &n, 4);
  if (!px) throw std::runtime_error("cannot read image " + path + ": " + stbi_failure_reason());
  for (size_t i = 0; i < count; ++i) {
    uint8_t a = px[4 * i + 3];
    for (int c = 0; c < 3; ++c) {
      uint8_t v = px[4 * i + c];
      img.rgb[3 * i + c] = a == 255 ? v : over_white(v, a);
    }
  }
  stbi_image_free(px);
  return img;
}

// ---- EXIF orientation (what PIL's ImageOps.exif_transpose applies) ---------------------
// The Orientation tag (0x0112) of IFD0 in a TIFF-structured EXIF block; 1 when absent.
int exif_orientation(const uint8_t* p, size_t n) {
  if (n < 8) return 1;
  bool le = p[0] == 'I' && p[1] == 'I';
  if (!le && !(p[0] == 'M' && p[1] == 'M')) return 1;
  auto u16 = [&](size_t o) -> uint32_t { return o + 2 > n ? 0 : le ? p[o] | p[o + 1] << 8 : p[o] << 8 | p[o + 1]; };
  auto u32 = [&](size_t o) -> uint32_t {
    return o + 4 > n ? 0 : le ? p[o] | p[o + 1] << 8 | p[o + 2] << 16 | static_cast<uint32_t>(p[o + 3]) << 24
                              : static_cast<uint32_t>(p[o]) << 24 | p[o + 1] << 16 | p[o + 2] << 8 | p[o + 3];
  };
  size_t ifd = u32(4);
  uint32_t entries = u16(ifd);
  for (uint32_t i = 0; i < entries && ifd + 2 + 12 * (i + 1) <= n; ++i) {
    size_t e = ifd + 2 + 12 * i;
    if (u16(e) == 0x0112) {
      uint32_t v = u16(e + 8);
      return v >= 1 && v <= 8 ? static_cast<int>(v) : 1;
    }
  }
  return 1;
}

int jpeg_orientation(const std::vector<uint8_t>& d) {
  size_t i = 2;
  while (i + 4 <= d.size() && d[i] == 0xFF) {
    uint8_t marker = d[i + 1];
    size_t len = static_cast<size_t>(d[i + 2]) << 8 | d[i + 3];
    if (marker == 0xDA || len < 2) break;  // start of scan: no more metadata
    if (marker == 0xE1 && len >= 8 && i + 2 + len <= d.size() && std::memcmp(&d[i + 4], "Exif\0\0", 6) == 0)
      return exif_orientation(&d[i + 10], len - 8);
    i += 2 + len;
  }
  return 1;
}

int png_orientation(const std::vector<uint8_t>& d) {
  size_t i = 8;
  while (i + 12 <= d.size()) {
    size_t len = static_cast<size_t>(d[i]) << 24 | d[i + 1] << 16 | d[i + 2] << 8 | d[i + 3];
    if (i + 12 + len > d.size()) break;
    if (std::memcmp(&d[i + 4], "eXIf", 4) == 0) return exif_orientation(&d[i + 8], len);
    if (std::memcmp(&d[i + 4], "IDAT", 4) == 0) break;  // Pillow reads eXIf before the pixels
    i += 12 + len;
  }
  return 1;
}

// Source pixel of output (x, y) for each orientation, as PIL's transposes map them.
RgbImage upright(const RgbImage& in, int orientation) {
  if (orientation == 1) return in;
  bool swap = orientation >= 5;
  int W = swap ? in.height : in.width, H = swap ? in.width : in.height;
  RgbImage out{W, H, std::vector<uint8_t>(in.rgb.size())};
  for (int y = 0; y < H; ++y)
    for (int x = 0; x < W; ++x) {
      int sx = x, sy = y;
      switch (orientation) {
        case 2: sx = in.width - 1 - x; break;                               // FLIP_LEFT_RIGHT
        case 3: sx = in.width - 1 - x; sy = in.height - 1 - y; break;       // ROTATE_180
        case 4: sy = in.height - 1 - y; break;                              // FLIP_TOP_BOTTOM
        case 5: sx = y; sy = x; break;                                      // TRANSPOSE
        case 6: sx = y; sy = in.height - 1 - x; break;                      // ROTATE_270
        case 7: sx = in.width - 1 - y; sy = in.height - 1 - x; break;       // TRANSVERSE
        case 8: sx = in.width - 1 - y; sy = x; break;                       // ROTATE_90
      }
      std::memcpy(&out.rgb[(static_cast<size_t>(y) * W + x) * 3], &in.rgb[(static_cast<size_t>(sy) * in.width + sx) * 3], 3);
    }
  return out;
}

struct JpegError {
  jpeg_error_mgr mgr;
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void on_jpeg_error(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegError*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  longjmp(err->jump, 1);
}

// libjpeg's defaults are Pillow's: islow IDCT, fancy upsampling, its YCbCr -> RGB.
RgbImage decode_jpeg(const std::vector<uint8_t>& data, const std::string& path) {
  jpeg_decompress_struct cinfo;
  JpegError err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = on_jpeg_error;
  RgbImage img;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    throw std::runtime_error("cannot read image " + path + ": " + err.message);
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data.data(), static_cast<unsigned long>(data.size()));
  jpeg_read_header(&cinfo, TRUE);
  try {
    check_pixels(cinfo.image_width, cinfo.image_height, path);
  } catch (...) {
    jpeg_destroy_decompress(&cinfo);
    throw;
  }
  bool gray = cinfo.jpeg_color_space == JCS_GRAYSCALE;
  if (!gray && cinfo.jpeg_color_space != JCS_YCbCr && cinfo.jpeg_color_space != JCS_RGB) {
    jpeg_destroy_decompress(&cinfo);
    throw std::runtime_error("cannot read image " + path + ": CMYK/YCCK JPEGs are not supported");
  }
  cinfo.out_color_space = gray ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_start_decompress(&cinfo);
  img.width = static_cast<int>(cinfo.output_width);
  img.height = static_cast<int>(cinfo.output_height);
  img.rgb.resize(static_cast<size_t>(img.width) * img.height * 3);
  std::vector<uint8_t> row(static_cast<size_t>(img.width) * cinfo.output_components);
  while (cinfo.output_scanline < cinfo.output_height) {
    size_t y = cinfo.output_scanline;
    JSAMPROW rows[1] = {row.data()};
    jpeg_read_scanlines(&cinfo, rows, 1);
    uint8_t* out = &img.rgb[y * img.width * 3];
    for (int x = 0; x < img.width; ++x)
      for (int c = 0; c < 3; ++c) out[3 * x + c] = gray ? row[x] : row[3 * x + c];
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return img;
}

// ---- Pillow's Resample.c, 8 bits per channel -------------------------------------------
constexpr int PRECISION_BITS = 32 - 8 - 2;

double bicubic_filter(double x) {
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

struct Coeffs {
  int ksize = 0;
  std::vector<int> bounds;  // (first input index, count) per output index
  std::vector<int32_t> k;   // ksize fixed-point weights per output index
};

Coeffs precompute(int in_size, int out_size) {
  double scale = static_cast<double>(in_size) / out_size;
  double filterscale = scale < 1.0 ? 1.0 : scale;
  double support = 2.0 * filterscale;  // bicubic support is 2
  Coeffs c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.bounds.resize(2 * out_size);
  c.k.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> kk(c.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    double center = (xx + 0.5) * scale;
    double ww = 0.0, ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    for (int x = 0; x < xmax; ++x) {
      kk[x] = bicubic_filter((x + xmin - center + 0.5) * ss);
      ww += kk[x];
    }
    for (int x = 0; x < xmax; ++x) {
      double v = ww != 0.0 ? kk[x] / ww : kk[x];
      c.k[static_cast<size_t>(xx) * c.ksize + x] =
          static_cast<int32_t>(v < 0 ? -0.5 + v * (1 << PRECISION_BITS) : 0.5 + v * (1 << PRECISION_BITS));
    }
    c.bounds[2 * xx] = xmin;
    c.bounds[2 * xx + 1] = xmax;
  }
  return c;
}

uint8_t clip8(int32_t v) {
  if (v >= (1 << PRECISION_BITS << 8)) return 255;
  if (v <= 0) return 0;
  return static_cast<uint8_t>(v >> PRECISION_BITS);
}

}  // namespace

RgbImage read_image(const std::string& path) {
  std::vector<uint8_t> data = read_file(path);
  // Decoded, then turned upright by its EXIF orientation (as pg_edge.inputs.images does).
  if (data.size() >= 8 && data[0] == 0x89 && data[1] == 'P' && data[2] == 'N' && data[3] == 'G')
    return upright(decode_png(data, path), png_orientation(data));
  if (data.size() >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF)
    return upright(decode_jpeg(data, path), jpeg_orientation(data));
  throw std::runtime_error("cannot read image " + path + ": not a PNG or JPEG file");
}

RgbImage resize_bicubic(const RgbImage& in, int width, int height) {
  bool need_h = width != in.width, need_v = height != in.height;
  if (!need_h && !need_v) return in;
  Coeffs h = precompute(in.width, width);
  Coeffs v = precompute(in.height, height);
  const RgbImage* src = &in;
  RgbImage tmp;
  if (need_h) {
    // Only the rows the vertical pass reads are resampled horizontally (as Pillow does).
    int first = v.bounds[0];
    int last = v.bounds[2 * height - 2] + v.bounds[2 * height - 1];
    for (int i = 0; i < height; ++i) v.bounds[2 * i] -= first;
    tmp = {width, last - first, std::vector<uint8_t>(static_cast<size_t>(width) * (last - first) * 3)};
    for (int yy = 0; yy < tmp.height; ++yy) {
      const uint8_t* row = &in.rgb[static_cast<size_t>(yy + first) * in.width * 3];
      for (int xx = 0; xx < width; ++xx) {
        int xmin = h.bounds[2 * xx], xmax = h.bounds[2 * xx + 1];
        const int32_t* k = &h.k[static_cast<size_t>(xx) * h.ksize];
        for (int c = 0; c < 3; ++c) {
          int32_t ss = 1 << (PRECISION_BITS - 1);
          for (int x = 0; x < xmax; ++x) ss += row[(x + xmin) * 3 + c] * k[x];
          tmp.rgb[(static_cast<size_t>(yy) * width + xx) * 3 + c] = clip8(ss);
        }
      }
    }
    if (!need_v) return tmp;
    src = &tmp;
  }
  RgbImage out{width, height, std::vector<uint8_t>(static_cast<size_t>(width) * height * 3)};
  for (int yy = 0; yy < height; ++yy) {
    int ymin = v.bounds[2 * yy], ymax = v.bounds[2 * yy + 1];
    const int32_t* k = &v.k[static_cast<size_t>(yy) * v.ksize];
    for (int xx = 0; xx < width; ++xx)
      for (int c = 0; c < 3; ++c) {
        int32_t ss = 1 << (PRECISION_BITS - 1);
        for (int y = 0; y < ymax; ++y) ss += src->rgb[(static_cast<size_t>(y + ymin) * width + xx) * 3 + c] * k[y];
        out.rgb[(static_cast<size_t>(yy) * width + xx) * 3 + c] = clip8(ss);
      }
  }
  return out;
}

std::vector<float> preprocess(const RgbImage& img, int size) {
  RgbImage r = resize_bicubic(img, size, size);
  std::vector<float> out(r.rgb.size());
  for (size_t i = 0; i < r.rgb.size(); ++i) {
    float x = static_cast<float>(r.rgb[i] * (1.0 / 255.0));
    out[i] = (x - 0.5f) / 0.5f;
  }
  return out;
}

}  // namespace pgedge
