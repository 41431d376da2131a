// Encoding and checking a slot's header.
#include "store/slot_format.h"

#include <cctype>
#include <cstring>

#include "store/aligned_buffer.h"
#include "store/checksum.h"

namespace paged_kv::store {

namespace {

constexpr size_t kMagicAt = 0;
constexpr size_t kVersionAt = 8;
constexpr size_t kHeaderBytesAt = 12;
constexpr size_t kTenantAt = 16;
constexpr size_t kSessionAt = 24;
constexpr size_t kLogicalPageAt = 32;
constexpr size_t kGenerationAt = 40;
constexpr size_t kPayloadBytesAt = 48;
constexpr size_t kPayloadChecksumAt = 56;
constexpr size_t kHeaderChecksumAt = 64;
constexpr size_t kFieldsEnd = 72;

template <typename T>
void put(unsigned char* header, size_t at, T value) {
  std::memcpy(header + at, &value, sizeof value);
}

template <typename T>
T get(const unsigned char* header, size_t at) {
  T value;
  std::memcpy(&value, header + at, sizeof value);
  return value;
}

// The checksum of the whole header with its own checksum field read as zero.
uint64_t header_checksum(const unsigned char* header) {
  const uint64_t fields = checksum64(header, kHeaderChecksumAt);
  return checksum64(header + kFieldsEnd, kSlotHeaderBytes - kFieldsEnd, fields);
}

// The magic as printable text, e.g. "PKVSLOT1", or its bytes in hex when it is not text.
std::string printable_magic(const unsigned char* header) {
  bool text = true;
  for (size_t i = 0; i < sizeof kSlotMagic; ++i) text = text && std::isprint(header[i]);
  if (text) {
    return "\"" + std::string(reinterpret_cast<const char*>(header), sizeof kSlotMagic) + "\"";
  }
  static const char* digits = "0123456789abcdef";
  std::string hex = "0x";
  for (size_t i = 0; i < sizeof kSlotMagic; ++i) {
    hex += digits[header[i] >> 4];
    hex += digits[header[i] & 15];
  }
  return hex;
}

void add_mismatch(std::string& out, const char* field, const std::string& held,
                  const std::string& wanted) {
  if (!out.empty()) out += "; ";
  out += std::string(field) + " (slot holds " + held + ", read expected " + wanted + ")";
}

}  // namespace

int64_t slot_bytes_for(int64_t page_bytes) {
  const int64_t align = static_cast<int64_t>(kIoAlignment);
  return static_cast<int64_t>(kSlotHeaderBytes) + (page_bytes + align - 1) / align * align;
}

std::string describe_tag(const SlotTag& tag) {
  return "tenant " + std::to_string(tag.tenant) + ", session " + std::to_string(tag.session) +
         ", logical page " + std::to_string(tag.logical_page) + ", generation " +
         std::to_string(tag.generation);
}

void encode_slot_header(unsigned char* header, const SlotTag& tag, uint64_t payload_bytes,
                        uint64_t payload_checksum) {
  std::memset(header, 0, kSlotHeaderBytes);
  std::memcpy(header + kMagicAt, kSlotMagic, sizeof kSlotMagic);
  put<uint32_t>(header, kVersionAt, kSlotFormatVersion);
  put<uint32_t>(header, kHeaderBytesAt, static_cast<uint32_t>(kSlotHeaderBytes));
  put<int32_t>(header, kTenantAt, tag.tenant);
  put<int64_t>(header, kSessionAt, tag.session);
  put<int64_t>(header, kLogicalPageAt, tag.logical_page);
  put<uint64_t>(header, kGenerationAt, tag.generation);
  put<uint64_t>(header, kPayloadBytesAt, payload_bytes);
  put<uint64_t>(header, kPayloadChecksumAt, payload_checksum);
  put<uint64_t>(header, kHeaderChecksumAt, header_checksum(header));
}

std::string check_slot_header(const unsigned char* header, const SlotTag& expected,
                              uint64_t payload_bytes, uint64_t* payload_checksum) {
  if (std::memcmp(header + kMagicAt, kSlotMagic, sizeof kSlotMagic) != 0) {
    return "no slot header (magic is " + printable_magic(header) + ", expected \"PKVSLOT1\"): " +
           "the slot was never written, or its header was overwritten";
  }
  const uint64_t stored_checksum = get<uint64_t>(header, kHeaderChecksumAt);
  const uint64_t actual_checksum = header_checksum(header);
  if (stored_checksum != actual_checksum) {
    return "header checksum mismatch (stored " + std::to_string(stored_checksum) +
           ", computed " + std::to_string(actual_checksum) + "): the header is corrupt";
  }
  const uint32_t version = get<uint32_t>(header, kVersionAt);
  if (version != kSlotFormatVersion) {
    return "slot format version " + std::to_string(version) + ", this library reads version " +
           std::to_string(kSlotFormatVersion);
  }
  const uint32_t header_bytes = get<uint32_t>(header, kHeaderBytesAt);
  if (header_bytes != kSlotHeaderBytes) {
    return "header size " + std::to_string(header_bytes) + ", expected " +
           std::to_string(kSlotHeaderBytes);
  }
  const uint64_t stored_bytes = get<uint64_t>(header, kPayloadBytesAt);
  if (stored_bytes != payload_bytes) {
    return "payload size mismatch (slot holds " + std::to_string(stored_bytes) +
           " bytes, expected " + std::to_string(payload_bytes) + ")";
  }
  SlotTag held;
  held.tenant = get<int32_t>(header, kTenantAt);
  held.session = get<int64_t>(header, kSessionAt);
  held.logical_page = get<int64_t>(header, kLogicalPageAt);
  held.generation = get<uint64_t>(header, kGenerationAt);
  std::string mismatch;
  if (held.tenant != expected.tenant) {
    add_mismatch(mismatch, "tenant", std::to_string(held.tenant), std::to_string(expected.tenant));
  }
  if (held.session != expected.session) {
    add_mismatch(mismatch, "session", std::to_string(held.session),
                 std::to_string(expected.session));
  }
  if (held.logical_page != expected.logical_page) {
    add_mismatch(mismatch, "logical page", std::to_string(held.logical_page),
                 std::to_string(expected.logical_page));
  }
  if (held.generation != expected.generation) {
    add_mismatch(mismatch, "generation", std::to_string(held.generation),
                 std::to_string(expected.generation));
  }
  if (!mismatch.empty()) {
    return "tag mismatch: " + mismatch + "; the slot holds " + describe_tag(held) +
           ", the read asked for " + describe_tag(expected);
  }
  *payload_checksum = get<uint64_t>(header, kPayloadChecksumAt);
  return std::string();
}

}  // namespace paged_kv::store
