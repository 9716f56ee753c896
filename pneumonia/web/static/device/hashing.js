// The fingerprints of the model's files: sha256 hex digests, as the model card records them.

// crypto.subtle exists only in a secure context (https, or http on localhost); elsewhere the files
// cannot be checked, so the page refuses to screen rather than run an unchecked model.
export async function sha256Hex(buffer) {
  if (!(globalThis.crypto && globalThis.crypto.subtle)) {
    throw new Error(
      "This page must be opened over https (or on localhost) to check the model's fingerprints: no screening without them."
    );
  }
  const digest = new Uint8Array(await globalThis.crypto.subtle.digest("SHA-256", buffer));
  return Array.from(digest, (x) => x.toString(16).padStart(2, "0")).join("");
}
