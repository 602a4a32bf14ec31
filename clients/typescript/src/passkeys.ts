// Passkeys in the browser, with the browser's own WebAuthn JSON parsers (WebAuthn Level 3)
// and no library: the server's optionsJson goes in, the authenticator's answer comes out
// as the JSON text that finishPasskeyRegistration and finishPasskeyLogin take as
// credentialJson.

/** The browser cannot do what was asked: no WebAuthn, or no Level 3 JSON parsers. */
export class PasskeysUnsupportedError extends Error {
  override name = "PasskeysUnsupportedError";
}

type Parser = "parseCreationOptionsFromJSON" | "parseRequestOptionsFromJSON";

function requireParser(parser: Parser): void {
  if (
    typeof PublicKeyCredential === "undefined" ||
    typeof navigator === "undefined" ||
    !navigator.credentials
  ) {
    throw new PasskeysUnsupportedError(
      "This browser has no WebAuthn (PublicKeyCredential), or the page is not a secure " +
        "context (https, or http on localhost).",
    );
  }
  if (typeof PublicKeyCredential[parser] !== "function") {
    throw new PasskeysUnsupportedError(
      `This browser lacks PublicKeyCredential.${parser} (WebAuthn Level 3): ` +
        "passkeys need a newer browser.",
    );
  }
}

function answer(credential: Credential | null): string {
  if (!(credential instanceof PublicKeyCredential)) {
    throw new DOMException("The authenticator gave no passkey.", "NotAllowedError");
  }
  return JSON.stringify(credential.toJSON());
}

/**
 * Registers a passkey: `optionsJson` from startPasskeyRegistration; resolves to the
 * credentialJson for finishPasskeyRegistration. Rejects as navigator.credentials.create
 * does (NotAllowedError: the user closed the prompt; InvalidStateError: this
 * authenticator already holds one of the account's passkeys).
 */
export async function createPasskey(
  optionsJson: string,
  { signal }: { signal?: AbortSignal } = {},
): Promise<string> {
  requireParser("parseCreationOptionsFromJSON");
  const publicKey = PublicKeyCredential.parseCreationOptionsFromJSON(JSON.parse(optionsJson));
  return answer(await navigator.credentials.create({ publicKey, signal }));
}

/** Whether the browser offers passkeys in its autofill (conditional mediation). */
export async function passkeyAutofillAvailable(): Promise<boolean> {
  return (
    typeof PublicKeyCredential !== "undefined" &&
    typeof PublicKeyCredential.isConditionalMediationAvailable === "function" &&
    typeof PublicKeyCredential.parseRequestOptionsFromJSON === "function" &&
    (await PublicKeyCredential.isConditionalMediationAvailable())
  );
}

/**
 * Signs in with a passkey: `optionsJson` from startPasskeyLogin (or an OtpChallenge's
 * passkeyOptionsJson); resolves to the credentialJson for finishPasskeyLogin.
 *
 * `conditional`: offer the passkeys in the autofill of an input whose autocomplete ends in
 * "webauthn" (start it when the page loads, after passkeyAutofillAvailable(); it waits
 * until the user picks one). Abort it with `signal` before starting a modal one (a
 * "Sign in with a passkey" button): a page has one WebAuthn request at a time.
 */
export async function getPasskey(
  optionsJson: string,
  { conditional = false, signal }: { conditional?: boolean; signal?: AbortSignal } = {},
): Promise<string> {
  requireParser("parseRequestOptionsFromJSON");
  const publicKey = PublicKeyCredential.parseRequestOptionsFromJSON(JSON.parse(optionsJson));
  return answer(
    await navigator.credentials.get({
      publicKey,
      signal,
      ...(conditional ? { mediation: "conditional" as const } : {}),
    }),
  );
}
