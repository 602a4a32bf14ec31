// Sign-in with another identity provider (Google, Apple, GitHub, any OpenID Connect
// issuer the server is configured with), from the browser's own crypto and no library.
//
// A web app, by a redirect through the provider:
//   1. startRedirectSignIn(baseUrl, provider, redirectTo): keep `verifier` (in
//      sessionStorage: the page is left for the provider) and send the browser to
//      `authorizeUrl`.
//   2. The server comes back to redirectTo with ?code=... (or ?error=...&error_description=...):
//      redirectAnswer(location.href) reads it.
//   3. finishRedirectSignIn(code, verifier): the variables of ExchangeSignInCode, whose
//      answer is an AuthResult like a login's (app.ts next()).
// A link to the signed-in account is the same dance started by startIdentityLink
// (startLink(provider, redirectTo) gives its variables and the verifier); its exchange
// goes with the session's bearer token.
//
// A native app with the provider's SDK: idTokenNonce() for the SDK's request, then
// signInWithIdToken(provider, idToken, { nonce }) for SignInWithIdToken.

import type {
  ExchangeSignInCodeMutationVariables,
  IdentitiesQuery,
  IdentityProvidersQuery,
  SignInWithIdTokenMutationVariables,
  StartIdentityLinkMutation,
  StartIdentityLinkMutationVariables,
  UnlinkIdentityMutation,
} from "./generated/graphql";

function base64url(bytes: Uint8Array): string {
  let text = "";
  for (const byte of bytes) text += String.fromCharCode(byte);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

async function sha256(text: string): Promise<Uint8Array> {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text)));
}

/** A PKCE pair (RFC 7636): a verifier of 32 random bytes and its S256 challenge. */
export async function pkcePair(): Promise<{ verifier: string; challenge: string }> {
  const verifier = base64url(crypto.getRandomValues(new Uint8Array(32)));
  return { verifier, challenge: base64url(await sha256(verifier)) };
}

/**
 * Starts a redirect sign-in: where to send the browser (the server's
 * /auth/{provider}/authorize), and the PKCE verifier to keep until it comes back.
 * `redirectTo` must be one of the server's AUTH_REDIRECT_URLS, exactly.
 */
export async function startRedirectSignIn(
  baseUrl: string,
  provider: string,
  redirectTo: string,
): Promise<{ authorizeUrl: string; verifier: string }> {
  const { verifier, challenge } = await pkcePair();
  const url = new URL(`/auth/${encodeURIComponent(provider)}/authorize`, baseUrl);
  url.searchParams.set("redirect_to", redirectTo);
  url.searchParams.set("code_challenge", challenge);
  url.searchParams.set("code_challenge_method", "S256");
  return { authorizeUrl: url.toString(), verifier };
}

export type RedirectAnswer =
  | { kind: "code"; code: string }
  // CANCELLED (the user declined at the provider), PROVIDER_ERROR or INVALID_TOKEN;
  // `description` is for display, as text.
  | { kind: "error"; error: string; description: string };

/** What the redirect came back with, read from the app's URL; null where it is not one. */
export function redirectAnswer(location: string | URL): RedirectAnswer | null {
  const params = new URL(location).searchParams;
  const code = params.get("code");
  if (code !== null) return { kind: "code", code };
  const error = params.get("error");
  if (error !== null) {
    return { kind: "error", error, description: params.get("error_description") ?? error };
  }
  return null;
}

/** The variables of ExchangeSignInCode for the code the redirect came back with. */
export function finishRedirectSignIn(
  code: string,
  verifier: string,
  { deviceToken = null }: { deviceToken?: string | null } = {},
): ExchangeSignInCodeMutationVariables {
  return { code, codeVerifier: verifier, deviceToken };
}

/**
 * The variables of StartIdentityLink (signed in, with a recent sign-in) and the verifier
 * to keep for the exchange that follows the redirect.
 */
export async function startLink(
  provider: string,
  redirectTo: string,
): Promise<{ variables: StartIdentityLinkMutationVariables; verifier: string }> {
  const { verifier, challenge } = await pkcePair();
  return { variables: { provider, redirectTo, codeChallenge: challenge }, verifier };
}

export type LinkStart =
  | { kind: "redirect"; authorizeUrl: string }
  | { kind: "reauthenticate" }
  | { kind: "error"; message: string };

export function linkStart(result: StartIdentityLinkMutation["startIdentityLink"]): LinkStart {
  if (result.__typename === "IdentityLinkStart") {
    return { kind: "redirect", authorizeUrl: result.authorizeUrl };
  }
  return result.code === "REAUTHENTICATION_REQUIRED"
    ? { kind: "reauthenticate" }
    : { kind: "error", message: result.message };
}

/**
 * A nonce for a provider SDK's ID token: `hashed` (SHA-256, hex) goes to the SDK (Sign in
 * with Apple, Google's Credential Manager take it this way), `raw` to signInWithIdToken.
 */
export async function idTokenNonce(): Promise<{ raw: string; hashed: string }> {
  const raw = base64url(crypto.getRandomValues(new Uint8Array(32)));
  const hashed = Array.from(await sha256(raw), (byte) => byte.toString(16).padStart(2, "0"));
  return { raw, hashed: hashed.join("") };
}

/** The variables of SignInWithIdToken for an ID token from the provider's SDK. */
export function signInWithIdToken(
  provider: string,
  idToken: string,
  {
    nonce = null,
    name = null,
    deviceToken = null,
  }: { nonce?: string | null; name?: string | null; deviceToken?: string | null } = {},
): SignInWithIdTokenMutationVariables {
  return { provider, idToken, nonce, name, deviceToken };
}

/** The "Sign in with ..." buttons: id and label of each configured provider. */
export function providerButtons(
  data: IdentityProvidersQuery,
  { idTokenOnly = false }: { idTokenOnly?: boolean } = {},
): { id: string; label: string }[] {
  return data.identityProviders
    .filter((provider) => !idTokenOnly || provider.supportsIdToken)
    .map((provider) => ({ id: provider.id, label: `Sign in with ${provider.name}` }));
}

export function linkedProviders(data: IdentitiesQuery): string[] {
  return data.me === null ? [] : data.me.identities.map((identity) => identity.provider);
}

/** The providers still linked after unlinkIdentity, or null where it was refused. */
export function unlinked(result: UnlinkIdentityMutation["unlinkIdentity"]): string[] | null {
  return result.__typename === "User"
    ? result.identities.map((identity) => identity.provider)
    : null;
}
