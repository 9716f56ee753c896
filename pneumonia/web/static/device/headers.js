// What the server answers before decoding (web/uploads.py: read_upload, reading/decoding.py:
// sniff_format and _open_image): the type, the size and completeness, read from the file's header.

// pneumonia.errors.XrayReadError: its message is what the page shows.
export class ReadError extends Error {}

const NOT_AN_IMAGE = "the upload is not a supported image (JPEG, PNG, BMP, TIFF or DICOM).";

export function readHeader(bytes, reading) {
  if (bytes.length === 0) throw new ReadError("The uploaded file is empty.");
  const format = sniff(bytes);
  if (format === "JPEG") return checkSize(jpegHeader(bytes), reading);
  if (format === "PNG") return checkSize(pngHeader(bytes), reading);
  if (format) {
    throw new ReadError(`This page reads JPEG and PNG files; a ${format} file can be screened by the server mode.`);
  }
  throw new ReadError(`The upload is not a supported image type. Upload a ${reading.accepted_types} file.`);
}

export function sniff(bytes) {  // decoding.IMAGE_SIGNATURES
  const starts = (offset, magic) => magic.every((byte, i) => bytes[offset + i] === byte);
  if (starts(0, [0xff, 0xd8, 0xff])) return "JPEG";
  if (starts(0, [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])) return "PNG";
  if (starts(0, [0x42, 0x4d])) return "BMP";
  if (starts(0, [0x49, 0x49, 0x2a, 0x00]) || starts(0, [0x4d, 0x4d, 0x00, 0x2a])) return "TIFF";
  if (starts(128, [0x44, 0x49, 0x43, 0x4d])) return "DICOM";
  return null;
}

function jpegHeader(bytes) {
  // Walks the markers to the frame header (SOF0..SOF15 but DHT, JPG, DAC), as Pillow's opener does.
  let i = 2;
  while (i + 9 < bytes.length) {
    if (bytes[i] !== 0xff || bytes[i + 1] === 0xff) { i++; continue; }
    const marker = bytes[i + 1];
    if (marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker)) {
      const frame = { format: "JPEG", height: (bytes[i + 5] << 8) | bytes[i + 6], width: (bytes[i + 7] << 8) | bytes[i + 8] };
      frame.colour = bytes[i + 9] >= 3;
      frame.complete = lastMarker(bytes, 0xd9) > i;  // an end-of-image marker after the frame
      return frame;
    }
    if (marker === 0xda) break;
    i += 2 + ((bytes[i + 2] << 8) | bytes[i + 3]);
  }
  throw new ReadError(NOT_AN_IMAGE);
}

function lastMarker(bytes, marker) {
  for (let i = bytes.length - 2; i >= 0; i--) if (bytes[i] === 0xff && bytes[i + 1] === marker) return i;
  return -1;
}

function pngHeader(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes.length < 33) throw new ReadError(NOT_AN_IMAGE);
  const frame = { format: "PNG", width: view.getUint32(16), height: view.getUint32(20), depth: bytes[24] };
  frame.colour = [2, 3, 6].includes(bytes[25]);
  frame.complete = false;
  for (let offset = 8; offset + 8 <= bytes.length; offset += 12 + view.getUint32(offset)) {
    if (view.getUint32(offset + 4) === 0x49454e44) frame.complete = true;  // IEND
  }
  return frame;
}

function checkSize(frame, reading) {
  const { width, height } = frame;
  if (width * height > reading.pillow_max_image_pixels) {
    throw new ReadError("the upload declares too many pixels to be an X-ray; refused before decoding.");
  }
  if (width * height > reading.max_image_pixels) {
    const allowed = reading.max_image_pixels.toLocaleString("en-US");
    throw new ReadError(`the upload is ${width}x${height} pixels, more than the ${allowed} allowed; refused before decoding.`);
  }
  if (width < reading.min_side || height < reading.min_side) {
    throw new ReadError(`the upload is only ${width}x${height} pixels: too small to be an X-ray.`);
  }
  if (frame.depth === 16) {
    throw new ReadError("This page reads 8-bit images; a 16-bit PNG can be screened by the server mode.");
  }
  if (!frame.complete) throw new ReadError("The image is corrupt or truncated (its data ends early).");
  return frame;
}
