// How a single-page app uses the generated types: every answer of the AuthResult union
// is handled, and the compiler says so when the schema changes under the app.
import type {
  LoginMutation,
  MeQuery,
  RefreshMutation,
  SetupTotpMutation,
  SignupMutation,
  VerifyOtpMutation,
} from "./generated/graphql";

type Result = SignupMutation["signup"] | LoginMutation["login"] | VerifyOtpMutation["verifyOtp"];

export type Next =
  | { kind: "signedIn"; accessToken: string; expiresIn: number }
  | { kind: "code"; challengeToken: string; method: "TOTP" | "EMAIL"; purpose: string }
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
