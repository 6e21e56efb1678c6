// pg-edge-run: run a PaliGemma bundle (from `pg-edge export`) on one image and prompt, with
// MLX's C++ library alone -- no Python.
//
//   pg-edge-run BUNDLE --image IMAGE --prompt TEXT [--max-tokens N] [--json] [--detect]
//
// Text streams to stdout; --json prints one object (text, tokens, finish_reason, timings) as
// `pg-edge run --json` does; --detect adds the parsed boxes (pixels of the original image).
// Any error is one line on stderr and exit status 2.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

#include "bundle.h"
#include "image.h"
#include "text.h"

using json = nlohmann::json;

namespace {

struct Args {
  std::string bundle, image, prompt, dump_pixels, parse_text;
  int max_tokens = 256;
  bool json = false, detect = false;
};

const char* kUsage =
    "usage: pg-edge-run BUNDLE --image IMAGE --prompt TEXT [--max-tokens N] [--json] [--detect]\n"
    "  BUNDLE          folder written by `pg-edge export MODEL -o BUNDLE`\n"
    "  --image IMAGE   PNG or JPEG\n"
    "  --prompt TEXT   task prompt, e.g. \"caption en\" or \"detect cat ; dog\"\n"
    "  --max-tokens N  most tokens to generate (default 256; the bundle's context may hold fewer)\n"
    "  --json          print one JSON object: text, tokens, finish_reason, timings\n"
    "  --detect        parse the output as boxes (label and x1 y1 x2 y2 in image pixels)\n"
    "  --dump-pixels F write the preprocessed image (float32 S x S x 3) to F and exit\n"
    "  --parse TEXT    parse TEXT as a detection output instead of generating (needs --image)\n";

Args parse_args(int argc, char** argv) {
  Args a;
  auto value = [&](int& i) -> std::string {
    if (i + 1 >= argc) throw std::runtime_error(std::string(argv[i]) + " needs a value");
    return argv[++i];
  };
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    if (s == "-h" || s == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (s == "--image") a.image = value(i);
    else if (s == "--prompt") a.prompt = value(i);
    else if (s == "--max-tokens") {
      std::string v = value(i);
      size_t used = 0;
      try {
        a.max_tokens = std::stoi(v, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != v.size() || a.max_tokens < 1) throw std::runtime_error("--max-tokens must be an integer >= 1, got " + v);
    } else if (s == "--json") a.json = true;
    else if (s == "--detect") a.detect = true;
    else if (s == "--dump-pixels") a.dump_pixels = value(i);
    else if (s == "--parse") a.parse_text = value(i);
    else if (!s.empty() && s[0] == '-') throw std::runtime_error("unknown option " + s);
    else if (a.bundle.empty()) a.bundle = s;
    else throw std::runtime_error("unexpected argument " + s);
  }
  if (a.image.empty()) throw std::runtime_error("--image is required");
  if (a.parse_text.empty() && a.dump_pixels.empty() && (a.bundle.empty() || a.prompt.empty()))
    throw std::runtime_error("BUNDLE and --prompt are required");
  return a;
}

json objects_json(const std::string& text, int width, int height) {
  std::vector<pgedge::DetectedObject> objects;
  std::vector<pgedge::Skipped> skipped;
  pgedge::parse_objects(text, width, height, objects, skipped);
  json out = {{"objects", json::array()}, {"skipped", json::array()}};
  for (const auto& o : objects)
    out["objects"].push_back({{"label", o.label},
                              {"box", {o.box[0], o.box[1], o.box[2], o.box[3]}},
                              {"loc", {o.loc[0], o.loc[1], o.loc[2], o.loc[3]}},
                              {"seg", o.seg}});
  for (const auto& s : skipped) out["skipped"].push_back({{"text", s.text}, {"reason", s.reason}});
  return out;
}

void print_objects(const json& parsed) {
  for (const auto& o : parsed["objects"])
    std::printf("%s\t%.1f %.1f %.1f %.1f\n", o["label"].get<std::string>().c_str(), o["box"][0].get<double>(),
                o["box"][1].get<double>(), o["box"][2].get<double>(), o["box"][3].get<double>());
  for (const auto& s : parsed["skipped"])
    std::fprintf(stderr, "skipped %s: %s\n", s["text"].get<std::string>().c_str(), s["reason"].get<std::string>().c_str());
}

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

int run(const Args& a) {
  pgedge::RgbImage image = pgedge::read_image(a.image);  // a bad image fails before the model loads
  if (!a.parse_text.empty()) {
    json parsed = objects_json(a.parse_text, image.width, image.height);
    if (a.json) std::cout << dump(parsed) << "\n";
    else print_objects(parsed);
    return 0;
  }
  auto t_load = std::chrono::steady_clock::now();
  if (!a.dump_pixels.empty() && a.bundle.empty()) throw std::runtime_error("--dump-pixels needs BUNDLE (its image size)");
  pgedge::Runner runner(a.bundle);
  const pgedge::Manifest& m = runner.manifest();
  std::vector<float> pixels = pgedge::preprocess(image, m.image_size);
  if (!a.dump_pixels.empty()) {
    std::ofstream f(a.dump_pixels, std::ios::binary);
    f.write(reinterpret_cast<const char*>(pixels.data()), static_cast<std::streamsize>(pixels.size() * sizeof(float)));
    if (!f) throw std::runtime_error("cannot write " + a.dump_pixels);
    return 0;
  }
  pgedge::Tokenizer tok(m.tokenizer_file, m.ids);
  std::vector<int> ids = tok.prompt_ids(a.prompt, m.num_image_tokens);
  double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count();

  pgedge::StreamText stream(tok);
  std::vector<int> tokens;
  bool echo = !a.json && !a.detect;
  pgedge::Timings t;
  std::string finish = runner.generate(pixels, ids, a.max_tokens, [&](int id) {
    tokens.push_back(id);
    std::string piece = stream.add(id);
    if (echo && !piece.empty()) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    }
    return true;
  }, t);
  std::string tail = stream.finish();
  const std::string& text = stream.text();
  int n = static_cast<int>(tokens.size());
  if (a.json) {
    json out = {{"text", text}, {"tokens", tokens}, {"finish_reason", finish},
                {"prompt_tokens", static_cast<int>(ids.size())}, {"generation_tokens", n},
                {"timings", {{"load_s", load_s}, {"vision_s", t.vision_s}, {"prefill_s", t.prefill_s},
                             {"ttft_s", t.vision_s + t.prefill_s}, {"generation_s", t.generation_s},
                             {"prompt_tps", t.prefill_s > 0 ? ids.size() / t.prefill_s : 0.0},
                             {"generation_tps", t.generation_s > 0 ? n / t.generation_s : 0.0}}}};
    if (a.detect) out.update(objects_json(text, image.width, image.height));
    std::cout << dump(out) << "\n";
    return 0;
  }
  if (a.detect) {
    print_objects(objects_json(text, image.width, image.height));
    return 0;
  }
  std::fwrite(tail.data(), 1, tail.size(), stdout);
  std::printf("\n");
  std::fprintf(stderr, "[%zu prompt tokens, %d generated, %.1f tok/s, first token after %.3f s%s]\n", ids.size(), n,
               t.generation_s > 0 ? n / t.generation_s : 0.0, t.vision_s + t.prefill_s,
               finish == "length" && n < a.max_tokens ? ", the bundle's context is full" : "");
  return 0;
}

// One line of at most 400 characters: some MLX messages list every input (kilobytes).
std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  if (s.size() > 400) s = s.substr(0, 400) + "...";
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pg-edge-run: error: %s\n", one_line(e.what()).c_str());
    return 2;
  } catch (...) {
    std::fprintf(stderr, "pg-edge-run: error: unexpected failure\n");
    return 2;
  }
}
