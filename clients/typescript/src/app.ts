// How a single-page app uses the generated types: every answer of the AuthResult union
// is handled, and the compiler says so when the schema changes under the app.
import type {
  DeletePasskeyMutation,
  ExchangeSignInCodeMutation,
  FinishPasskeyLoginMutation,
  FinishPasskeyRegistrationMutation,
  LoginMutation,
  MeQuery,
  PasskeysQuery,
  RefreshMutation,
  SetupTotpMutation,
  SignInWithIdTokenMutation,
  SignupMutation,
  StartPasskeyLoginMutation,
  StartPasskeyRegistrationMutation,
  VerifyOtpMutation,
} from "./generated/graphql";

type Result =
  | SignupMutation["signup"]
  | LoginMutation["login"]
  | VerifyOtpMutation["verifyOtp"]
  | FinishPasskeyLoginMutation["finishPasskeyLogin"]
  | ExchangeSignInCodeMutation["exchangeSignInCode"]
  | SignInWithIdTokenMutation["signInWithIdToken"];

export type Next =
  | { kind: "signedIn"; accessToken: string; expiresIn: number }
  | {
      kind: "code";
      challengeToken: string;
      method: "TOTP" | "EMAIL";
      purpose: string;
      // Set where a passkey may answer this step: getPasskey(it), then finishPasskeyLogin
      // with this challengeToken.
      passkeyOptionsJson: string | null;
    }
  | { kind: "error"; message: string; retryAfter: number | null };

export function next(result: Result): Next {
  switch (result.__typename) {
    case "AuthSession":
      return { kind: "signedIn", accessToken: result.accessToken, expiresIn: result.expiresIn };
    case "OtpChallenge":
      return {
        kind: "code",
        challengeToken: result.challengeToken,
        method: result.method,
        purpose: result.purpose,
        passkeyOptionsJson: result.passkeyOptionsJson,
      };
    case "AuthError":
      return { kind: "error", message: result.message, retryAfter: result.retryAfter };
    default: {
      const unhandled: never = result;
      return unhandled;
    }
  }
}

export function refreshedToken(result: RefreshMutation["refresh"]): string | null {
  if (result.__typename === "AuthSession") {
    // Null under cookie transport: the refresh token stays in its HttpOnly cookie.
    return result.refreshToken;
  }
  return null;
}

export function greeting(data: MeQuery): string {
  const me = data.me;
  return me === null ? "Not signed in" : `${me.email}${me.emailVerified ? "" : " (unverified)"}`;
}

export function qrCode(result: SetupTotpMutation["setupTotp"]): string | null {
  return result.__typename === "TotpSetup" ? result.qrCodeSvg : null;
}

export type Ceremony =
  | { kind: "ceremony"; challengeToken: string; optionsJson: string }
  | { kind: "reauthenticate" }
  | { kind: "error"; message: string };

// startPasskeyRegistration needs a recent sign-in: REAUTHENTICATION_REQUIRED sends the
// user through reauthenticate first.
export function registration(
  result: StartPasskeyRegistrationMutation["startPasskeyRegistration"],
): Ceremony {
  if (result.__typename === "PasskeyCeremony") {
    return {
      kind: "ceremony",
      challengeToken: result.challengeToken,
      optionsJson: result.optionsJson,
    };
  }
  return result.code === "REAUTHENTICATION_REQUIRED"
    ? { kind: "reauthenticate" }
    : { kind: "error", message: result.message };
}

export function addedPasskey(
  result: FinishPasskeyRegistrationMutation["finishPasskeyRegistration"],
): string | null {
  return result.__typename === "Passkey" ? result.name : null;
}

export function passkeyNames(data: PasskeysQuery): string[] {
  return data.me === null
    ? []
    : data.me.passkeys.map((p) => `${p.name}${p.lastUsedAt === null ? " (never used)" : ""}`);
}

export function passkeysLeft(result: DeletePasskeyMutation["deletePasskey"]): number | null {
  return result.__typename === "User" ? result.passkeys.length : null;
}

export function passkeyLogin(result: StartPasskeyLoginMutation["startPasskeyLogin"]): Ceremony {
  return result.__typename === "PasskeyCeremony"
    ? { kind: "ceremony", challengeToken: result.challengeToken, optionsJson: result.optionsJson }
    : { kind: "error", message: result.message };
}
