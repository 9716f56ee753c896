"""A PACS over DICOMweb: QIDO-RS finds chest X-rays, WADO-RS fetches each, the one screening pipeline
screens it, and STOW-RS stores the result back in the same study as a Structured Report (TID 1500) and
a Grad-CAM Secondary Capture. Imports reading, serving, errors and labels only."""
