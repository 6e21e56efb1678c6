// PNG/JPEG decoding and Pillow-exact bicubic resizing (see image.h).
#include "image.h"

#include <csetjmp>
#include <cmath>
#include <cstdio>
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

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("image not found: " + path);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
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

RgbImage decode_png(const std::vector<uint8_t>& data, const std::string& path) {
  int w = 0, h = 0, n = 0;
  uint8_t* px = stbi_load_from_memory(data.data(), static_cast<int>(data.size()), &w, &h, &n, 4);
  if (!px) throw std::runtime_error("cannot read image " + path + ": " + stbi_failure_reason());
  RgbImage img{w, h, std::vector<uint8_t>(static_cast<size_t>(w) * h * 3)};
  for (size_t i = 0; i < static_cast<size_t>(w) * h; ++i) {
    uint8_t a = px[4 * i + 3];
    for (int c = 0; c < 3; ++c) {
      uint8_t v = px[4 * i + c];
      img.rgb[3 * i + c] = a == 255 ? v : over_white(v, a);
    }
  }
  stbi_image_free(px);
  return img;
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
  if (data.size() >= 8 && data[0] == 0x89 && data[1] == 'P' && data[2] == 'N' && data[3] == 'G')
    return decode_png(data, path);
  if (data.size() >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF) return decode_jpeg(data, path);
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
