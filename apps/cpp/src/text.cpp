// Tokenizer, streaming text and detection parsing (see text.h).
#include "text.h"

#include <regex>
#include <set>
#include <sstream>
#include <stdexcept>

#include <sentencepiece_processor.h>

namespace pgedge {

Tokenizer::Tokenizer(const std::string& model_file, SpecialIds ids)
    : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()), ids_(std::move(ids)) {
  auto status = sp_->Load(model_file);
  if (!status.ok()) throw std::runtime_error("cannot read tokenizer " + model_file + ": " + status.ToString());
  pieces_ = sp_->GetPieceSize();
}

Tokenizer::~Tokenizer() = default;

std::vector<int> Tokenizer::encode(const std::string& text) const {
  std::vector<int> out;
  auto status = sp_->Encode(text, &out);
  if (!status.ok()) throw std::runtime_error("cannot tokenize the prompt: " + status.ToString());
  // As pg_edge's Tokenizer.encode: typed text never becomes a control token.
  for (int i : out)
    if (i == ids_.bos || i == ids_.eos || i == ids_.pad || i == ids_.image)
      throw std::runtime_error("this tokenizer turns text such as <image> or <eos> in the prompt into control tokens; "
                               "remove them from the prompt");
  return out;
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
  std::vector<int> keep;
  for (int i : ids)
    if (i != ids_.bos && i != ids_.eos && i != ids_.pad && i >= 0 && i < pieces_) keep.push_back(i);
  std::string out;
  auto status = sp_->Decode(keep, &out);
  if (!status.ok()) throw std::runtime_error("cannot detokenize: " + status.ToString());
  return out;
}

std::vector<int> Tokenizer::prompt_ids(const std::string& prefix, int num_image_tokens) const {
  std::vector<int> ids(num_image_tokens, ids_.image);
  ids.push_back(ids_.bos);
  for (int t : encode(prefix)) ids.push_back(t);
  for (int t : ids_.newline) ids.push_back(t);
  return ids;
}

namespace {
const std::string kReplacement = "\xEF\xBF\xBD";  // U+FFFD

std::string strip_replacements(std::string s) {
  while (s.size() >= 3 && s.compare(s.size() - 3, 3, kReplacement) == 0) s.resize(s.size() - 3);
  return s;
}
}  // namespace

std::string StreamText::add(int token) {
  ids_.push_back(token);
  std::string stable = strip_replacements(tok_.decode(ids_));
  if (stable.compare(0, emitted_.size(), emitted_) != 0) return "";  // re-joined: wait for finish()
  std::string piece = stable.substr(emitted_.size());
  emitted_ = stable;
  return piece;
}

std::string StreamText::finish() {
  std::string text = tok_.decode(ids_);
  if (text.compare(0, emitted_.size(), emitted_) != 0) return "";
  std::string piece = text.substr(emitted_.size());
  emitted_ = text;
  return piece;
}

// ---- detection ---------------------------------------------------------------------------
namespace {

struct Atom {
  std::string kind;  // loc, seg, sep, text
  int value = 0;
  std::string text;
  size_t start = 0, end = 0;
};

bool blank(const std::string& s) { return s.find_first_not_of(" \t\r\n\f\v") == std::string::npos; }

std::vector<Atom> atoms(const std::string& text) {
  static const std::regex piece("<(loc|seg)(\\d+)>|;");
  std::vector<Atom> out;
  size_t pos = 0;
  for (auto it = std::sregex_iterator(text.begin(), text.end(), piece); it != std::sregex_iterator(); ++it) {
    size_t s = it->position(0), e = s + it->length(0);
    if (!blank(text.substr(pos, s - pos))) out.push_back({"text", 0, text.substr(pos, s - pos), pos, s});
    if (it->str(0) == ";") out.push_back({"sep", 0, "", s, e});
    else out.push_back({it->str(1), std::stoi(it->str(2).substr(0, 9)), "", s, e});
    pos = e;
  }
  if (!blank(text.substr(pos))) out.push_back({"text", 0, text.substr(pos), pos, text.size()});
  return out;
}

std::string trim(const std::string& s) {
  size_t a = s.find_first_not_of(" \t\r\n\f\v");
  if (a == std::string::npos) return "";
  return s.substr(a, s.find_last_not_of(" \t\r\n\f\v") - a + 1);
}

std::string collapse(const std::string& s) {
  std::istringstream in(s);
  std::string word, out;
  while (in >> word) out += (out.empty() ? "" : " ") + word;
  return out;
}

// The reason a chunk is not an object, or "" with `obj` filled in.
std::string parse_chunk(const std::vector<Atom>& chunk, int width, int height, DetectedObject& obj) {
  size_t n_loc = 0;
  while (n_loc < chunk.size() && chunk[n_loc].kind == "loc") ++n_loc;
  if (n_loc == 0) return chunk[0].kind == "text" ? "stray text without <loc> tokens" : "no <loc> tokens";
  size_t n_seg = 0;
  while (n_loc + n_seg < chunk.size() && chunk[n_loc + n_seg].kind == "seg") ++n_seg;
  std::string label;
  for (size_t i = n_loc + n_seg; i < chunk.size(); ++i) {
    if (chunk[i].kind != "text") return "tokens after the label";
    label += (label.empty() ? "" : " ") + chunk[i].text;
  }
  if (n_loc != 4) return "expected 4 <loc> tokens, got " + std::to_string(n_loc);
  for (int i = 0; i < 4; ++i) obj.loc[i] = chunk[i].value;
  std::string loc = "(" + std::to_string(obj.loc[0]) + ", " + std::to_string(obj.loc[1]) + ", " +
                    std::to_string(obj.loc[2]) + ", " + std::to_string(obj.loc[3]) + ")";
  for (int v : obj.loc)
    if (v >= 1024) return "<loc> value out of range 0..1023: " + loc;
  if (n_seg && n_seg != 16) return "truncated or overlong mask: " + std::to_string(n_seg) + " of 16 <seg> tokens";
  obj.seg.clear();
  for (size_t i = 0; i < n_seg; ++i) {
    if (chunk[4 + i].value >= 128) return "<seg> value out of range 0..127";
    obj.seg.push_back(chunk[4 + i].value);
  }
  if (obj.loc[2] <= obj.loc[0] || obj.loc[3] <= obj.loc[1]) return "empty box: need y2 > y1 and x2 > x1, got (y1, x1, y2, x2) = " + loc;
  obj.label = collapse(label);
  obj.box[0] = obj.loc[1] / 1023.0 * width;
  obj.box[1] = obj.loc[0] / 1023.0 * height;
  obj.box[2] = obj.loc[3] / 1023.0 * width;
  obj.box[3] = obj.loc[2] / 1023.0 * height;
  return "";
}

}  // namespace

void parse_objects(const std::string& text, int width, int height, std::vector<DetectedObject>& objects,
                   std::vector<Skipped>& skipped) {
  std::vector<Atom> all = atoms(text);
  std::vector<std::vector<Atom>> chunks;
  std::vector<Atom> chunk;
  // Split at ";" and where a <loc> run starts after other content (a missing " ; ").
  for (const Atom& a : all) {
    if (a.kind == "sep" || (a.kind == "loc" && !chunk.empty() && chunk.back().kind != "loc")) {
      if (!chunk.empty()) chunks.push_back(chunk);
      chunk.clear();
      if (a.kind == "sep") continue;
    }
    chunk.push_back(a);
  }
  if (!chunk.empty()) chunks.push_back(chunk);
  for (const auto& c : chunks) {
    DetectedObject obj{};
    std::string reason = parse_chunk(c, width, height, obj);
    if (reason.empty()) objects.push_back(obj);
    else skipped.push_back({trim(text.substr(c.front().start, c.back().end - c.front().start)), reason});
  }
}

}  // namespace pgedge
