// Image reading and PaliGemma preprocessing, the way pg_edge.inputs.processor does it with Pillow.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pgedge {

// 8-bit RGB, row-major, 3 bytes per pixel.
struct RgbImage {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> rgb;
};

// Reads a PNG (stb_image) or a JPEG (libjpeg, as Pillow decodes it), upright by its EXIF
// orientation, within pg_edge's pixel limit, 16-bit grey scaled to 8 bits; transparency is
// composited onto white with Pillow's alpha_composite arithmetic. Throws std::runtime_error
// with a one-line message on a missing, unreadable or unsupported file.
RgbImage read_image(const std::string& path);

// Pillow's Image.resize(..., BICUBIC) for 8-bit RGB: separable, antialiased (support scaled
// by the downscale factor), a = -0.5, fixed-point coefficients with 22 fraction bits and a
// rounded 8-bit image between the horizontal and the vertical pass.
RgbImage resize_bicubic(const RgbImage& in, int width, int height);

// read_image -> resize_bicubic to size x size -> x / 255 (in double, then float) ->
// (x - 0.5) / 0.5. Returns float32[size * size * 3], NHWC without the batch axis.
std::vector<float> preprocess(const RgbImage& img, int size);

}  // namespace pgedge
